"""The dual-step coordinator: one small actor per training worker group, owning the ALM state (lambda, rho and
their history) of every CaCT job in the group. Rank 0 sends each dual step's per-class statistics with the
step's number; the coordinator applies it once and returns the new state, which rank 0 broadcasts. A call
repeated for a step already applied (a restarted worker replaying an epoch) gets the stored answer.

Its own module, importing only cact_ops.alm: the actor's process starts without the training stage's imports.
In local mode (``num_workers=0``) the worker is the driver, and the same class is used as a plain object.
"""
from __future__ import annotations

import ray

from cact_ops.alm import DualConfig, DualState

# An explicit namespace: a driver, a Tune trial and the Train workers each run in their own namespace otherwise.
NAMESPACE = "cact"


class Coordinator:
    """The DualState of each job (by job name); applies each dual step exactly once (keyed by its number)."""

    def __init__(self, jobs: dict[str, tuple[int, dict]]):
        self.duals = {job: DualState(k, DualConfig(**config)) for job, (k, config) in jobs.items()}
        self.results: dict[str, dict[int, dict]] = {job: {} for job in jobs}  # step -> state after that step

    def update(self, job: str, step: int, grad_sums, counts, h_means, epoch: int) -> dict:
        """Dual step number ``step`` (0, 1, ...; several per epoch with ``dual_every_steps``) of ``job``."""
        dual, results = self.duals[job], self.results[job]
        if step in results:  # a repeated call (e.g. after a restart): the stored answer, applied once
            dual.load_state_dict(results[step])
            return results[step]
        if dual.steps != step:
            raise RuntimeError(f"{job}: dual step {step} asked, but the state has {dual.steps} steps")
        dual.update(grad_sums, counts, h_means, epoch=epoch)
        results[step] = dual.state_dict()
        return results[step]

    def seed(self, job: str, state: dict) -> None:
        """Re-seed from a checkpoint's dual state (after a restart); stored answers stay authoritative."""
        self.duals[job].load_state_dict(state)

    def history(self, job: str) -> list:
        return self.duals[job].history


# num_cpus=0: the coordinator only does bookkeeping and must never wait for a CPU that the workers hold.
DualCoordinator = ray.remote(num_cpus=0, max_restarts=0)(Coordinator)
