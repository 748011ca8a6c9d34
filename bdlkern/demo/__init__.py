"""``python -m bdlkern.demo``: Bayesian MLPs and conv nets on scikit-learn's digits, end to end
(``make demo``).

What it does:

1. **Data.** scikit-learn's bundled 8x8 digits (1797 images, no download), scaled to [0, 1] and
   flattened to 64 features; one fixed stratified 70/30 train/test split (split seed 0, whatever
   ``--seed`` says, so every run sees the same data).
2. **Out-of-distribution sets**, both made from the *test* digits (:data:`OOD_TRANSFORMS`):
   ``rot90`` (each image rotated by 90 degrees, ``np.rot90``) and ``inverted`` (``1 - x``).
3. **Models** (:data:`METHODS`), all MLPs 64-256-256-10 with ReLU, trained with Adam on the same
   minibatches from the same initial weights where the architectures agree:

   * ``plain``: ``nn.Linear`` layers, no dropout (deterministic);
   * ``mc_dropout``: the plain MLP with ``nn.Dropout(p)`` before the hidden and output layers,
     turned into :class:`bdlkern.nn.MCDropoutLinear` layers by :func:`bdlkern.nn.convert`;
   * ``concrete``: :class:`bdlkern.nn.ConcreteDropoutLinear` layers that learn their dropout rate;
   * ``sparse_vd``: :class:`bdlkern.nn.SparseVDLinear` layers (KL term / N_train), pruned to CSR;
   * ``ard``: the sparse-VD MLP with ``prior="ard"`` (the exact KL of an empirical-Bayes Gaussian
     prior), pruned to CSR;
   * ``variational_dropout``: :class:`bdlkern.nn.VariationalDropoutLinear` layers (Gaussian noise
     with alpha learnt per input unit, Kingma et al.'s KL term);
   * on request only (``--methods ...``): ``variance``, a variance network
     (:class:`bdlkern.nn.VarianceLinear` hidden layers with zero-mean weights, a linear read-out),
     and ``gaussian_dropout``, the plain MLP with :class:`bdlkern.nn.GaussianDropout` (learnt alpha
     per unit) where the MC-dropout model has ``nn.Dropout``.

   ``--methods NAME ...`` runs any subset of :data:`METHODS` (``all``: every one, including those
   left out by default).

   The conv section (``Method.conv``): LeNet-style conv nets (:func:`lenet`: two 3x3 convolutions
   of :data:`CONV_CHANNELS` with ReLU and 2x2 max pooling, then a linear layer) on the digits as
   ``[N, 1, 8, 8]`` images, trained for ``--conv-epochs`` (few) epochs:

   * ``conv_mc_dropout``: ``nn.Dropout2d`` before ``conv2`` and ``nn.Dropout`` before ``fc``,
     converted by :func:`bdlkern.nn.convert` into :class:`bdlkern.nn.MCDropoutConv2d` (channel
     masks) and :class:`bdlkern.nn.MCDropoutLinear`;
   * ``conv_concrete``: :class:`bdlkern.nn.ConcreteDropout2d` around ``conv2`` and
     :class:`bdlkern.nn.ConcreteDropout` around ``fc``, learning their rates;
   * ``conv_sparse_vd``: :class:`bdlkern.nn.SparseVDConv2d` layers and a SparseVDLinear, pruned
     (``fc`` to CSR, the convolutions' pruned weights zeroed).

4. **Evaluation** by :func:`bdlkern.uncertainty.mc_predict` with S samples: accuracy, NLL, ECE,
   Brier score, OOD AUROC by mutual information and by predictive entropy per OOD set, and the
   time of MC inference through bdlkern's fused kernels against the fastest of three ways to
   write it without bdlkern: the same network in plain PyTorch with ``nn.Dropout`` active, run S
   times in a loop, run once on the input replicated S times (``x.expand(S, ...)``; for the
   conv nets ``x.repeat(S, 1, 1, 1)``, folded into the batch as bdlkern does), or
   ``torch.func.vmap(lambda _: model(x), randomness="different")(torch.arange(S))``, each sample
   drawing its own masks in one vectorised call (a model vmap cannot run gets None and the reason
   in the report). ``torch.compile`` of the replicated model is measured by
   ``python -m bdlkern.bench --case models`` only: compiling every demo model would add minutes.
5. **Outputs** in ``--out`` (default ``results/``): ``report.json``, ``report.md`` and the figures
   of :data:`FIGURES`; the table is printed too.

Adding a method (e.g. sparse variational dropout) is adding one :class:`Method` to
:data:`METHODS`: how to build it, the extra per-dataset loss term (``bdlkern.nn.regularization``
collects Concrete regularisers and KL terms alike), an optional post-training step (pruning), the
per-layer numbers to report (learnt rate, sparsity) and the plain-PyTorch equivalent to time.

Exit status: 0 on success, 2 for bad arguments (argparse's usage errors, CUDA asked for but absent).

Layout of the package (each module says more in its docstring):

* :mod:`~bdlkern.demo.settings`: :class:`Settings` and :data:`QUICK`;
* :mod:`~bdlkern.demo.data`: the digits, their split and the OOD sets;
* :mod:`~bdlkern.demo.models`: :class:`Method`, :data:`METHODS`, the MLP builders, pruning and
  the plain-PyTorch equivalents;
* :mod:`~bdlkern.demo.training`: :func:`train` and its :class:`History`;
* :mod:`~bdlkern.demo.evaluation`: the metrics (:func:`evaluate`) and the MC-inference timing;
* :mod:`~bdlkern.demo.pipeline`: one method end to end (:func:`run_method`, :class:`ModelResult`);
* :mod:`~bdlkern.demo.figures`: :data:`FIGURES` (matplotlib, imported when drawing);
* :mod:`~bdlkern.demo.report`: the table, ``report.json`` and ``report.md``;
* :mod:`~bdlkern.demo.cli`: the command line, :func:`main` (``__main__`` only calls it).

Every name is re-exported here, so ``bdlkern.demo.X`` works as it did when the demo was one file.
Importing the package imports tqdm (for the progress bars), as before; scikit-learn and matplotlib
are imported only when the data are loaded and the figures drawn.
"""

from bdlkern.demo.settings import QUICK, Settings
from bdlkern.demo.data import OOD_TRANSFORMS, SPLIT_SEED, TEST_FRACTION, Data, OODTransform, load_data
from bdlkern.demo.models import (
    CONCRETE_INIT_P,
    CONCRETE_LENGTH_SCALE,
    CONCRETE_RATE_LR_SCALE,
    CONCRETE_TAU,
    CONCRETE_TEMPERATURE,
    CONV_CHANNELS,
    CONV_KERNEL,
    HIDDEN,
    IMAGE_SIDE,
    LOG_ALPHA_BINS,
    MC_DROPOUT_P,
    METHODS,
    SPARSE_VD_KL_WARMUP,
    SPARSE_VD_LOG_SIGMA2_INIT,
    SPARSE_VD_LR,
    SPARSE_VD_SHORT_EPOCHS,
    SPARSE_VD_THRESHOLD,
    DenseLRTConv,
    DenseLRTLinear,
    LayerStats,
    Method,
    concrete_coefficients,
    dropout_rates,
    eager_equivalent,
    eager_sparse_vd,
    lenet,
    mlp,
    prune_to_sparse,
    sparsity,
)
from bdlkern.demo.training import History, train
from bdlkern.demo.evaluation import (
    ECE_BINS,
    Evaluation,
    MCTiming,
    eager_batched_mc_predict,
    eager_vmap_mc_predict,
    eager_mc_predict,
    evaluate,
    prediction_summary,
    time_mc_inference,
)
from bdlkern.demo.pipeline import ModelResult, run_method
from bdlkern.demo.figures import (
    FIGURES,
    FigureSpec,
    draw_concrete_rates,
    draw_conv_filters,
    draw_layer_stats,
    draw_log_alpha,
    draw_mutual_information,
    draw_ood_examples,
    draw_reliability,
    draw_sparsity_pattern,
    draw_training,
    write_figures,
)
from bdlkern.demo.report import (
    SCHEMA_VERSION,
    Column,
    build_report,
    format_markdown,
    format_table,
    observations,
    table_columns,
)
from bdlkern.demo.cli import main, parse_args, selected_methods, settings_from_args

__all__ = [
    "build_report",
    "Column",
    "concrete_coefficients",
    "CONCRETE_INIT_P",
    "CONCRETE_LENGTH_SCALE",
    "CONCRETE_RATE_LR_SCALE",
    "CONCRETE_TAU",
    "CONCRETE_TEMPERATURE",
    "CONV_CHANNELS",
    "CONV_KERNEL",
    "Data",
    "DenseLRTConv",
    "DenseLRTLinear",
    "draw_concrete_rates",
    "draw_conv_filters",
    "draw_layer_stats",
    "draw_log_alpha",
    "draw_mutual_information",
    "draw_ood_examples",
    "draw_reliability",
    "draw_sparsity_pattern",
    "draw_training",
    "dropout_rates",
    "eager_batched_mc_predict",
    "eager_vmap_mc_predict",
    "eager_equivalent",
    "eager_mc_predict",
    "eager_sparse_vd",
    "ECE_BINS",
    "evaluate",
    "Evaluation",
    "FIGURES",
    "FigureSpec",
    "format_markdown",
    "format_table",
    "HIDDEN",
    "History",
    "IMAGE_SIDE",
    "LayerStats",
    "lenet",
    "load_data",
    "LOG_ALPHA_BINS",
    "main",
    "selected_methods",
    "MC_DROPOUT_P",
    "MCTiming",
    "Method",
    "METHODS",
    "mlp",
    "ModelResult",
    "observations",
    "OOD_TRANSFORMS",
    "OODTransform",
    "parse_args",
    "prediction_summary",
    "prune_to_sparse",
    "QUICK",
    "run_method",
    "SCHEMA_VERSION",
    "Settings",
    "settings_from_args",
    "SPARSE_VD_KL_WARMUP",
    "SPARSE_VD_LOG_SIGMA2_INIT",
    "SPARSE_VD_LR",
    "SPARSE_VD_SHORT_EPOCHS",
    "SPARSE_VD_THRESHOLD",
    "sparsity",
    "SPLIT_SEED",
    "table_columns",
    "TEST_FRACTION",
    "time_mc_inference",
    "train",
    "write_figures",
]
