"""The demo's data: scikit-learn's digits, their fixed stratified split (:func:`load_data`) and the
out-of-distribution sets made from the test digits (:data:`OOD_TRANSFORMS`).

scikit-learn (the ``[demo]`` extra) is imported by :func:`load_data` only, when it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

#: Fraction of the digits held out for testing, and the seed of that (stratified) split.
TEST_FRACTION = 0.3
SPLIT_SEED = 0


@dataclass(frozen=True)
class OODTransform:
    """A held-out transformation of the test digits that makes an out-of-distribution set.

    Attributes:
        name: short key (``report.json``, table headers).
        description: one sentence for the report.
        apply: images ``[N, 8, 8]`` in [0, 1] -> transformed images of the same shape.
    """

    name: str
    description: str
    apply: Callable[[np.ndarray], np.ndarray]


#: The out-of-distribution sets, each made from the test digits.
OOD_TRANSFORMS: tuple[OODTransform, ...] = (
    OODTransform(
        "rot90",
        "test digits rotated by 90 degrees counter-clockwise (np.rot90 of each 8x8 image)",
        lambda images: np.rot90(images, k=1, axes=(1, 2)),
    ),
    OODTransform(
        "inverted",
        "test digits with inverted intensities, 1 - x (white background, dark strokes)",
        lambda images: 1.0 - images,
    ),
)


@dataclass
class Data:
    """The digits split, flattened to ``[N, 64]`` float32 tensors on the run's device
    (:meth:`as_images`: the same as ``[N, 1, 8, 8]`` images).

    Attributes:
        x_train, y_train, x_test, y_test: the stratified split (labels int64).
        ood: OOD set name -> inputs ``[N_test, 64]`` (the transformed test digits).
        test_images: the test images ``[N_test, 8, 8]`` (NumPy, for the example figure).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    ood: dict[str, torch.Tensor]
    test_images: np.ndarray

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def num_classes(self) -> int:
        return int(self.y_train.max().item()) + 1

    def as_images(self) -> "Data":
        """The same split with every input as a one-channel image ``[N, 1, 8, 8]`` (views of the
        flat tensors), for the conv nets."""
        side = self.test_images.shape[-1]

        def image(x: torch.Tensor) -> torch.Tensor:
            return x.view(x.shape[0], 1, side, side)

        return Data(
            x_train=image(self.x_train),
            y_train=self.y_train,
            x_test=image(self.x_test),
            y_test=self.y_test,
            ood={name: image(x) for name, x in self.ood.items()},
            test_images=self.test_images,
        )


def load_data(device: torch.device | str = "cpu") -> Data:
    """scikit-learn's digits, scaled to [0, 1], split 70/30 stratified with seed :data:`SPLIT_SEED`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)  # pixel values are 0..16
    train_images, test_images, y_train, y_test = train_test_split(
        images, digits.target, test_size=TEST_FRACTION, stratify=digits.target, random_state=SPLIT_SEED
    )

    def flat(batch: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32).reshape(len(batch), -1)).to(device)

    def labels(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(y.astype(np.int64)).to(device)

    return Data(
        x_train=flat(train_images),
        y_train=labels(y_train),
        x_test=flat(test_images),
        y_test=labels(y_test),
        ood={t.name: flat(t.apply(test_images)) for t in OOD_TRANSFORMS},
        test_images=test_images,
    )
