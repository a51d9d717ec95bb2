"""cact_ops: the pure-PyTorch math of Class Adaptive Conformal Training (no Ray import, ever).

Marani et al., Class Adaptive Conformal Training, arXiv 2601.09522; building blocks ConfTr (Stutz et al.,
ICLR 2022) and CALS (Liu et al., CVPR 2023).

Subpackages, one concept each:
    scores    non-conformity scores (LAC, APS, RAPS; of probabilities, or Score.from_logits), the training-time
              log-prob score, the score registry
    cp        hard split conformal prediction (standard and class-wise; batched thresholds)
    metrics   coverage, size, CovGap, SSCV, shot-group sizes, accuracy (batched kernels), the metric registry
    engine    the CP evaluation engine: repeated calibration/test splits of a pool, summary rows
    ranking   the engine's per-row sort of the pool and set-size kernels (NumPy on the CPU)
    predictors  SplitPredictor, ClasswisePredictor: calibrate / predict / evaluate on logits (TorchCP's shape)
    smooth    differentiable quantile (torchsort) and soft sets
    alm       PHR penalty and per-class dual state (augmented Lagrangian)
    losses    CE, ConfTr, CaCT losses ((loss, diagnostics) or the scalar); CaCTLoss.dual_step from logits
    models    backbones per dataset family
    training  a plain epoch loop with the dual step, reused unchanged by the Ray Train stage
"""
__version__ = "0.1.0"
