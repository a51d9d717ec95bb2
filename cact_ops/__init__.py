"""cact_ops: the pure-PyTorch math of Class Adaptive Conformal Training (no Ray import, ever).

Marani et al., Class Adaptive Conformal Training, arXiv 2601.09522; building blocks ConfTr (Stutz et al.,
ICLR 2022) and CALS (Liu et al., CVPR 2023).

Subpackages, one concept each:
    scores    non-conformity scores (LAC, APS, RAPS) and the training-time log-prob score
    cp        hard split conformal prediction (standard and class-wise)
    metrics   coverage, size, CovGap, SSCV, shot-group sizes, accuracy
    smooth    differentiable quantile (torchsort) and soft sets
    alm       PHR penalty and per-class dual state (augmented Lagrangian)
    losses    CE, ConfTr, CaCT losses
    models    backbones per dataset family
    training  a plain epoch loop with the dual step, reused unchanged by the Ray Train stage
"""
__version__ = "0.1.0"
