"""One rank of the 2-process gloo test (tests/cact_ops/test_distributed.py), run as a script.

    python _dist_worker.py RANK WORLD INIT_FILE OUT_FILE CASE

Every rank builds the same global batch, takes its contiguous slice, runs each loss on it with gradient and
saves (loss, tau, diagnostics, gradient of its slice) to OUT_FILE; CASE picks a deliberate misuse instead.
"""
import sys

import torch
import torch.distributed as dist

from cact_ops.alm import DualState
from cact_ops.losses import CaCTLoss, CELoss, ConfTrLoss

N, K = 23, 4  # 23 rows over 2 ranks: unequal slices (12 + 11)


def global_batch():
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(N, K, generator=g)
    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 4 + [3] * 2)[torch.randperm(N, generator=g)]
    return logits, labels


def losses():
    """Fresh loss modules (same generator seed on every rank and in the single-process reference)."""
    dual = DualState(K)
    dual.lam = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    weights = 1.0 / torch.tensor([100.0, 30.0, 10.0, 3.0])
    common = dict(alpha=0.1, regularization_strength=1.0)
    return {
        "conftr": ConfTrLoss(generator=torch.Generator().manual_seed(1), **common),
        "conftr_log": ConfTrLoss(size_transform="log", coverage_weight=0.5,
                                 generator=torch.Generator().manual_seed(2), **common),
        "conftr_class": ConfTrLoss(classwise_tau=True, stratified=True, generator=torch.Generator().manual_seed(3),
                                   **common),
        "cact_class": CaCTLoss(dual, eta=1.0, reduction="class", cal_weights=weights,
                               generator=torch.Generator().manual_seed(4), **common),
        "cact_sample": CaCTLoss(dual, eta=1.0, reduction="sample", generator=torch.Generator().manual_seed(5),
                                **common),
    }


def slices(world):
    return torch.arange(N).tensor_split(world)


def main():
    rank, world, init_file, out_file, case = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    logits_all, labels_all = global_batch()
    idx = slices(world)[rank]
    out = {}
    try:
        if case == "classes":  # rank 1 has a model with one class fewer
            k = K if rank == 0 else K - 1
            ConfTrLoss()(logits_all[idx, :k], labels_all[idx].clamp(max=k - 1))
        elif case == "tiny":  # one sample in the whole global batch
            rows = slice(0, 1 if rank == 0 else 0)
            ConfTrLoss()(logits_all[rows], labels_all[rows])
        else:
            for name, loss_fn in losses().items():
                logits = logits_all[idx].clone().requires_grad_(True)
                loss, diag = loss_fn(logits, labels_all[idx])
                loss.backward()
                out[name] = {"loss": loss.detach(), "tau": diag["tau"], "penalty": diag["penalty"],
                             "ce": diag["ce"], "grad": logits.grad}
            logits = logits_all[idx].clone().requires_grad_(True)
            loss, _ = CELoss()(logits, labels_all[idx])
            loss.backward()
            out["ce_loss"] = {"loss": loss.detach(), "grad": logits.grad}
            from stages.train_worker import TorchDistComm  # the Ray stage's collectives, on the same group

            comm = TorchDistComm(torch.device("cpu"))
            out["comm"] = {"gather": comm.all_gather_cat(torch.arange(rank + 1)),
                           "sum": comm.all_reduce_sum(torch.ones(2, dtype=torch.float64))}
    except ValueError as e:
        out["error"] = str(e)
    torch.save(out, out_file)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
