"""One calibration batch for the whole job: the conformal losses under a 2-process gloo group equal one process
holding the union of the ranks' batches (threshold, loss and gradient), and misuse gives a clear error."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _dist_worker as w  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def run_ranks(tmp_path: Path, case: str = "losses", world: int = 2) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
    procs = [subprocess.Popen([sys.executable, str(Path(w.__file__)), str(r), str(world), str(tmp_path / "pg"),
                               str(outs[r]), case], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode()[-3000:]
    return [torch.load(o, weights_only=True) for o in outs]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_ranks(tmp_path_factory.mktemp("gloo"))


@pytest.mark.parametrize("name", list(w.losses()))
def test_two_ranks_equal_one_process_holding_the_union(two_ranks, name):
    logits_all, labels_all = w.global_batch()
    logits = logits_all.clone().requires_grad_(True)
    loss, diag = w.losses()[name](logits, labels_all)
    loss.backward()
    r0, r1 = two_ranks[0][name], two_ranks[1][name]
    # the same threshold on both ranks, and the one a single process computes from the union of their B_cal
    torch.testing.assert_close(r0["tau"], r1["tau"], rtol=0, atol=0)
    torch.testing.assert_close(r0["tau"], diag["tau"], rtol=1e-5, atol=1e-6)
    # every rank reports the global loss, penalty and CE
    for key in ("loss", "penalty", "ce"):
        torch.testing.assert_close(r0[key], r1[key], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(r0[key], (loss if key == "loss" else diag[key]).detach(), rtol=1e-5, atol=1e-6)
    # gradients reach the logits of both ranks: each rank holds world x the gradient of the global loss on its
    # slice (DDP then divides by the world size), so the slices put together give the single-process gradient
    grad = torch.cat([two_ranks[r][name]["grad"] for r in range(2)]) / 2
    torch.testing.assert_close(grad, logits.grad, rtol=1e-4, atol=1e-6)
    assert all(two_ranks[r][name]["grad"].abs().sum() > 0 for r in range(2))


def test_cross_entropy_is_the_global_batch_mean_on_unequal_slices(two_ranks):
    from cact_ops.losses import CELoss

    logits_all, labels_all = w.global_batch()
    logits = logits_all.clone().requires_grad_(True)
    loss, _ = CELoss()(logits, labels_all)
    loss.backward()
    for r in range(2):  # slices of 12 and 11 rows: a mean of the ranks' means would weigh them alike
        torch.testing.assert_close(two_ranks[r]["ce_loss"]["loss"], loss.detach(), rtol=1e-6, atol=1e-7)
    grad = torch.cat([two_ranks[r]["ce_loss"]["grad"] for r in range(2)]) / 2
    torch.testing.assert_close(grad, logits.grad, rtol=1e-5, atol=1e-7)


def test_the_training_stage_collectives_gather_in_rank_order_and_sum(two_ranks):
    for r in range(2):
        assert two_ranks[r]["comm"]["gather"].tolist() == [0, 0, 1]  # rank 0 sent [0], rank 1 [0, 1]
        assert two_ranks[r]["comm"]["sum"].tolist() == [2.0, 2.0]


def test_ranks_that_disagree_on_the_number_of_classes_get_a_clear_error(tmp_path):
    outs = run_ranks(tmp_path, "classes")
    for o in outs:
        assert "ranks disagree on the number of classes" in o["error"] and "logits.shape[1]" in o["error"]


def test_a_global_batch_too_small_for_b_cal_gets_a_clear_error(tmp_path):
    outs = run_ranks(tmp_path, "tiny")
    for o in outs:
        assert "1 sample(s) over 2 rank(s)" in o["error"] and "batch_size" in o["error"]
