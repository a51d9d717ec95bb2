"""The per-method sort of the pool and the set-size kernels of the evaluation engine (:mod:`cact_ops.engine`).

Everything here is done once per method or once per (split, alpha), over every pool row: sorting each row of
probabilities (shared by every rank-monotone score, see :class:`cact_ops.scores.Score`) and counting set sizes.
On the CPU these run through NumPy (SIMD sort, comparisons and bool counts several times faster than torch's,
in threads over row blocks: NumPy releases the GIL); elsewhere the same steps run as torch code on the tensors'
device. Both paths give identical numbers (tests switch ``_NUMPY_ON_CPU`` off to compare them).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

# On the CPU, NumPy's sort, comparisons and bool counts are several times faster than torch's (measured on the
# CI machine); elsewhere the torch code runs on the tensors' device. Tests switch this off to run that code here.
_NUMPY_ON_CPU = True


def _numpy_path(t: torch.Tensor) -> bool:
    return _NUMPY_ON_CPU and t.device.type == "cpu"


# Below this many elements per block a thread's start and hand-off cost more than the block's work (a 10k x 10
# sort takes about 0.5 ms in one thread).
_MIN_BLOCK_ELEMENTS = 1 << 18


def _in_threads(fn, n: int, min_block: int = 1024) -> None:
    """Run ``fn(slice)`` over up to ``torch.get_num_threads()`` contiguous blocks of ``range(n)`` in threads.

    NumPy releases the GIL in sorts, ufuncs and reductions, so blocks run in parallel (NumPy itself is
    single-threaded); with one thread, or fewer than two blocks of ``min_block``, it is a plain call.
    """
    parts = max(1, min(torch.get_num_threads(), n // max(min_block, 1)))
    if parts == 1:
        fn(slice(0, n))
        return
    bounds = np.linspace(0, n, parts + 1).astype(int)
    with ThreadPoolExecutor(parts) as pool:
        list(pool.map(fn, [slice(bounds[i], bounds[i + 1]) for i in range(parts)]))


# Up to this many entries, rank_pool finds ties in NumPy (cheaper calls); above, torch's threaded kernels win.
_SMALL_POOL = 1 << 20


def _row_block(width: int) -> int:
    """Rows per thread block worth a thread: at least 1024 rows and ``_MIN_BLOCK_ELEMENTS`` elements."""
    return max(1024, _MIN_BLOCK_ELEMENTS // max(width, 1))


@dataclass
class RankedPool:
    """Probabilities of every pool row sorted in decreasing order, once per method (shared by all scores).

    ``tie_*`` list the entries whose probability equals the one ranked just above: :meth:`share_ties` gives a
    tied class the score of its group's first rank, so a score depends on the probabilities only (sum of
    strictly larger p's for APS, 1 + number of strictly larger p's as the RAPS rank), whatever order the sort
    put ties in.
    """

    probs: torch.Tensor  # [n, K]
    desc: torch.Tensor  # [n, K] probabilities, largest first
    order: torch.Tensor | None  # [n, K] class at each rank; only built when class-order scores are needed
    rank_y: torch.Tensor  # [n] 0-based rank of the true class (number of strictly larger probabilities)
    tie_rows: torch.Tensor
    tie_cols: torch.Tensor
    tie_start: torch.Tensor
    order_rows: torch.Tensor | None = None  # rows that ``order`` covers (pool indices); None: every row

    def share_ties(self, s_rank: torch.Tensor) -> torch.Tensor:
        """In place: every tied entry of the rank-ordered scores takes its tie group's first value."""
        if self.tie_rows.numel():
            s_rank[self.tie_rows, self.tie_cols] = s_rank[self.tie_rows, self.tie_start]
        return s_rank

    def to_class_order(self, s_rank: torch.Tensor) -> torch.Tensor:
        """Rank-ordered scores [n, K] scattered back to class order (column k = class k); with ``order_rows``,
        only those rows, in that order ([len(order_rows), K])."""
        if self.order is None:
            raise ValueError("rank_pool(..., need_order=True) is needed for class-order scores from rank order")
        if self.order_rows is not None:
            s_rank = s_rank.index_select(0, self.order_rows)
        return torch.empty_like(s_rank).scatter_(1, self.order, s_rank)


def rank_pool(probs: torch.Tensor, labels: torch.Tensor, need_order: bool,
              order_rows: torch.Tensor | None = None) -> RankedPool:
    """Sort each row of ``probs`` once, largest first (NumPy's SIMD sort on the CPU, ``torch.sort`` elsewhere).

    ``order_rows`` (pool indices; CPU only) limits the class order (an argsort, several times the
    cost of a sort) to those rows, e.g. the test rows of one split: the other rows only need their sorted values.
    """
    labels = labels.to(probs.device)
    cpu = _numpy_path(probs)
    if not (cpu and need_order):
        order_rows = None
    if cpu and order_rows is not None:
        neg = np.negative(probs.numpy())
        sub = neg[order_rows.numpy()]
        order_np = np.empty(sub.shape, dtype=np.int64)

        def argsort_sub(rows: slice):
            order_np[rows] = np.argsort(sub[rows], axis=1)

        _in_threads(argsort_sub, sub.shape[0], _row_block(sub.shape[1]))
        _in_threads(lambda rows: neg[rows].sort(axis=1), neg.shape[0], _row_block(neg.shape[1]))
        desc, order = torch.from_numpy(np.negative(neg, out=neg)), torch.from_numpy(order_np)
    elif cpu:
        neg = np.negative(probs.numpy())  # ascending sort of -p = descending p, without a reversed copy
        if need_order:
            order_np = np.empty(neg.shape, dtype=np.int64)

            def argsort_rows(rows: slice):
                order_np[rows] = np.argsort(neg[rows], axis=1)

            _in_threads(argsort_rows, neg.shape[0], _row_block(neg.shape[1]))
            order = torch.from_numpy(order_np)
            desc = probs.gather(1, order)
        else:
            # In place: np.sort would copy.
            _in_threads(lambda rows: neg[rows].sort(axis=1), neg.shape[0], _row_block(neg.shape[1]))
            desc, order = torch.from_numpy(np.negative(neg, out=neg)), None
    else:
        desc, order = probs.sort(dim=1, descending=True)
        order = order if need_order else None
    if cpu and desc.numel() <= _SMALL_POOL:  # the same steps in NumPy: fewer, cheaper calls for small pools
        d = desc.numpy()
        tied_np = d[:, 1:] == d[:, :-1]
        rows_np, cols_np = np.nonzero(tied_np)
        cols_np = cols_np + 1
        start_np = cols_np - 1
        while rows_np.size:
            more = (start_np > 0) & tied_np[rows_np, np.maximum(start_np - 1, 0)]
            if not more.any():
                break
            start_np = np.where(more, start_np - 1, start_np)
        rows, cols, start = (torch.from_numpy(x.astype(np.int64, copy=False)) for x in (rows_np, cols_np, start_np))
        p = probs.numpy()
        p_y = p[np.arange(p.shape[0]), labels.numpy()][:, None]
        rank_y = _count_true(torch.from_numpy(p > p_y))
        return RankedPool(probs, desc, order, rank_y, rows, cols, start, order_rows)
    tied = desc[:, 1:] == desc[:, :-1]
    rows, cols = tied.nonzero(as_tuple=True)
    cols = cols + 1
    start = cols - 1
    # Runs of ties are short; walk each tied entry back to its group's first rank.
    while True:
        more = (start > 0) & tied[rows, (start - 1).clamp(min=0)]
        if not bool(more.any()):
            break
        start = torch.where(more, start - 1, start)
    p_y = probs.gather(1, labels[:, None])
    rank_y = _count_true(torch.from_numpy(probs.numpy() > p_y.numpy()) if cpu else probs > p_y)
    return RankedPool(probs, desc, order, rank_y, rows, cols, start, order_rows)


def _count_true(mask: torch.Tensor) -> torch.Tensor:
    """Per-row number of True entries of a bool [n, K] mask (NumPy on the CPU: several times faster there)."""
    if _numpy_path(mask):
        return torch.from_numpy(mask.numpy().sum(axis=1, dtype=np.int64))
    return mask.sum(dim=1)


def classwise_sizes(s_class: torch.Tensor, test: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Set sizes |{k : s(x, k) <= q_k}| of the test rows by comparison: [R, A, m] from class-ordered scores
    [n, K] and thresholds q [R, A, K] (class-wise; a standard threshold expanded over K for scores without the
    rank-ordered fast path).

    The one O(m K) step per (split, alpha); the rows of a split are gathered once and shared by the alphas.
    """
    r_, a_, _ = q.shape
    m = test.shape[1]
    if not _numpy_path(s_class):
        out = torch.empty(r_, a_, m, dtype=torch.int64, device=s_class.device)
        for r in range(r_):
            rows = s_class.index_select(0, test[r])
            for a in range(a_):
                out[r, a] = (rows <= q[r, a]).sum(dim=1)
        return out
    s_np, q_np, test_np = s_class.numpy(), q.numpy(), test.numpy()
    out = np.empty((r_, a_, m), dtype=np.int64)

    def splits(block: slice):  # one thread per block of splits, each with its own buffers
        rows = np.empty((m, s_np.shape[1]), dtype=s_np.dtype)
        mask = np.empty(rows.shape, dtype=bool)
        for r in range(block.start, block.stop):
            np.take(s_np, test_np[r], axis=0, out=rows, mode="clip")  # 'raise' buffers `out`
            for a in range(a_):
                np.less_equal(rows, q_np[r, a], out=mask)
                out[r, a] = mask.sum(axis=1, dtype=np.int32)

    _in_threads(splits, r_, min_block=1 if m * s_np.shape[1] >= 1 << 20 else r_)  # threads for big splits only
    return torch.from_numpy(out)


def prefix_sizes(s_rank: torch.Tensor, test: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Standard set sizes [R, A, m] of the test rows from rank-ordered scores [n, K] (rows non-decreasing) and
    thresholds q [R, A]: a set is a prefix of the rank order, so its size is the number of scores <= q.

    Every pool row at once: one binary search per (row, split, alpha) in the row's sorted scores.
    """
    r_, a_ = q.shape
    flat = q.reshape(1, r_ * a_).expand(s_rank.shape[0], r_ * a_).contiguous()
    all_sizes = torch.searchsorted(s_rank, flat, right=True).view(-1, r_, a_)
    return all_sizes.permute(1, 2, 0).gather(2, test[:, None, :].expand(r_, a_, -1))
