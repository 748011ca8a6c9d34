"""Monte Carlo prediction and uncertainty metrics (pure PyTorch).

:func:`mc_predict` runs a network once inside ``bdlkern.sampling(S)`` and summarises the ``S``
Monte Carlo samples of its output:

* classification (logits ``[S, N, C]``): the predictive distribution ``mean_probs`` (the mean of
  the per-sample softmax), its entropy (total uncertainty), the expected per-sample entropy
  (aleatoric part) and their difference, the mutual information between prediction and weights
  (epistemic part; BALD, Houlsby et al. 2011, Gal et al. 2017);
* regression (outputs ``[S, N]`` or ``[S, N, D]``): the MC mean and (epistemic) variance.

The metrics take tensors and return Python floats: :func:`nll`, :func:`brier`,
:func:`expected_calibration_error`, :func:`gaussian_log_likelihood` (the test log-likelihood of
Gal & Ghahramani 2016) and :func:`ood_auroc`; :func:`reliability_diagram` draws the calibration
curve. Entropies are in nats.

The package is split by concern: ``predict`` (:func:`mc_predict`, :class:`MCPrediction`),
``metrics`` (the scores, calibration and AUROC) and ``_checks`` (the argument checks both share).
Every name is re-exported here, the private helpers included, so ``bdlkern.uncertainty.X`` keeps
working for each of them. To monkeypatch a helper, patch it in the submodule whose functions look
it up (e.g. ``bdlkern.uncertainty.predict._run_block``): the names here are only aliases.
"""

from .._sampling import NoStochasticLayerWarning, current_sampling, sampling
from ._checks import (
    _ROW_SUM_TOL,
    _check_classification,
    _check_floating,
    _check_int,
    _check_positive_float,
    _check_probs,
    _check_tensor,
)
from .metrics import (
    _calibration_bins,
    _entropy,
    brier,
    entropy,
    expected_calibration_error,
    gaussian_log_likelihood,
    nll,
    ood_auroc,
    reliability_diagram,
)
from .predict import (
    _TORCH_DROPOUTS,
    MCPrediction,
    _no_stochastic_layer,
    _no_stochastic_layer_message,
    _run_block,
    mc_predict,
)

__all__ = [
    "MCPrediction",
    "NoStochasticLayerWarning",
    "mc_predict",
    "entropy",
    "nll",
    "brier",
    "expected_calibration_error",
    "gaussian_log_likelihood",
    "ood_auroc",
    "reliability_diagram",
]
