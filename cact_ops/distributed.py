"""What the conformal losses need from ``torch.distributed``: one calibration batch for the whole job.

Under data parallelism every rank holds a slice of the global batch. ConfTr and CaCT compute their smooth
threshold tau from the calibration part B_cal; taken per rank it would come from batch / (2 x ranks) scores and
the method would change with the worker count. These helpers gather the slices (with gradient where the loss
needs one) so every rank sees the global batch's B_cal; without an initialised process group (or with one rank)
they return their input unchanged, so single-process code pays nothing.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device() -> torch.device:
    """Where collectives run: the current CUDA device under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_ints(values: list[int]) -> torch.Tensor:
    """Every rank's ``values`` (the same length on each): a [world, len(values)] int64 tensor.

    >>> all_gather_ints([3, 10]).tolist()   # no process group: just this rank
    [[3, 10]]
    """
    _, w = world()
    t = torch.tensor(values, dtype=torch.int64)
    if w == 1:
        return t[None]
    dev = _device()
    parts = [torch.zeros_like(t, device=dev) for _ in range(w)]
    dist.all_gather(parts, t.to(dev))
    return torch.stack(parts).cpu()


class _GatherCat(torch.autograd.Function):
    """All-gather of unequal-length first dimensions, concatenated in rank order, with gradient.

    Backward: the gradient of the gathered tensor is summed over ranks (every rank's loss may depend on every
    rank's values), and each rank keeps the rows it contributed. That is the gradient of the sum of the ranks'
    losses; DDP's averaging of parameter gradients then makes it the gradient of their mean.
    """

    @staticmethod
    def forward(ctx, t: torch.Tensor, sizes: torch.Tensor):
        rank, w = world()
        dev = _device()
        m = int(sizes.max())
        padded = torch.zeros((m, *t.shape[1:]), dtype=t.dtype, device=dev)
        padded[: t.shape[0]] = t.detach().to(dev)
        parts = [torch.zeros_like(padded) for _ in range(w)]
        dist.all_gather(parts, padded)
        ctx.rank, ctx.sizes, ctx.src_device = rank, sizes, t.device
        return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)]).to(t.device)

    @staticmethod
    def backward(ctx, grad):
        g = grad.contiguous().to(_device())
        dist.all_reduce(g)
        start = int(ctx.sizes[: ctx.rank].sum())
        return g[start: start + int(ctx.sizes[ctx.rank])].to(ctx.src_device), None


def gather_cat(t: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
    """Concatenate every rank's ``t`` (first dimensions may differ) in rank order; differentiable.

    ``sizes`` ([world] first-dimension lengths) saves a collective when the caller already gathered them.

    >>> gather_cat(torch.arange(3.0)).tolist()   # no process group: unchanged
    [0.0, 1.0, 2.0]
    """
    _, w = world()
    if w == 1:
        return t
    if sizes is None:
        sizes = all_gather_ints([t.shape[0]])[:, 0]
    if t.requires_grad:
        return _GatherCat.apply(t, sizes)
    with torch.no_grad():
        return _GatherCat.forward(_Ctx(), t, sizes)


class _Ctx:
    """A stand-in for autograd's ctx when gathering without gradient."""


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (no gradient); ``t`` itself without a process group."""
    _, w = world()
    if w == 1:
        return t
    out = t.detach().to(_device()).clone()
    dist.all_reduce(out)
    return out.to(t.device)


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s ``t`` on every rank (no gradient); ``t`` itself without a process group."""
    _, w = world()
    if w == 1:
        return t
    out = t.detach().to(_device()).clone()
    dist.broadcast(out, src=src)
    return out.to(t.device)
