"""The README's plugin example ("Your own score, metric or method"), verbatim below this docstring (a test
checks it): importing it registers a score, a summary metric and a training method through the public
registries; the pipeline tests load it with ``--plugins tests.toy_plugin``."""
import torch

from cact_ops import methods
from cact_ops.losses import CELoss
from cact_ops.metrics import SummaryMetric, register_metric
from cact_ops.scores import Score, register_score


def class_offset(probs):  # 1 - p_k plus an offset growing with k: not monotone in the probability rank
    k = torch.arange(probs.shape[1], dtype=probs.dtype, device=probs.device)
    return 1.0 - probs + 0.05 * k / probs.shape[1]


def singletons(st):  # st: cact_ops.metrics.SetStats of R splits x A alphas -> one value per split and alpha
    return (st.sizes == 1).double().mean(-1)


def label_smoothed_ce(cfg, dual=None, **common):  # cfg: the method's TrainConfig
    return CELoss(label_smoothing=0.1)


register_score(Score("class_offset", class_offset))
register_metric(SummaryMetric("singletons", singletons, "singleton sets", lower_is_better=False))
methods.register(methods.Method("ce_smoothed", "ce", "CE with label smoothing 0.1", build_loss=label_smoothed_ce))
