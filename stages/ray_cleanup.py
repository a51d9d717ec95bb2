"""Placement groups left by a Ray Train controller that died without removing them (Tune kills a finished
trial's actor, and with it the trial's controller, first), and who frees them.

Ray Train starts a ``PlacementGroupCleaner`` per controller that removes the group once the controller is dead;
it asks Ray's state API with ``address=None``. Alone it freed every group of the 4-trial sweep test on this
machine, but in one CI run of the whole suite it left one (0.5 CPU, held for the rest of the job: the next test
found a CPU missing), and with several Ray instances on a machine ``address=None`` resolves another cluster or
none. So during a sweep :func:`orphans_released` removes such groups too: only this job's, only those whose
creator actor died, read from Ray's GCS tables through a private accessor (Ray 2.60; where it differs it warns
and removes nothing).

A creator's death is read from the actor table, not only from the group's ``creator_actor_dead`` flag: GCS sets
that flag on the groups registered when it processes the actor's death, so a group whose registration reaches
GCS after the death (a controller killed while creating its workers' group, before it could hand the group to
its cleaner) keeps the flag unset and is never freed by either cleaner. That is the leak CI hit.
"""
from __future__ import annotations

import contextlib
import threading
import time
import warnings

import ray


def _job_actor_placement_groups() -> list:
    """This job's live placement groups created by an actor (a Ray Train controller), as GCS table entries.
    Reads Ray's GCS table through a private accessor: Ray's public table hides the creator."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    job = ray.get_runtime_context().get_job_id()
    out = []
    for blob in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(blob)
        actor = pg.creator_actor_id
        by_actor = bool(actor) and actor != b"\xff" * len(actor) and actor != b"\x00" * len(actor)  # not nil
        if pg.state != gcs_pb2.PlacementGroupTableData.REMOVED and not pg.is_detached and by_actor \
                and pg.creator_job_id.hex() == job:
            out.append(pg)
    return out


def _actor_dead(actor_id: bytes) -> bool:
    """Whether GCS's actor table records this actor as dead (an actor it does not know is not taken as dead)."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    info = state._connect_and_get_accessor().get_actor_info(ray.ActorID(actor_id))
    return info is not None and \
        gcs_pb2.ActorTableData.FromString(info).state == gcs_pb2.ActorTableData.DEAD


def actor_placement_groups() -> int:
    """How many of this job's placement groups an actor created and nobody removed yet (0 if unreadable)."""
    try:
        return len(_job_actor_placement_groups())
    except Exception:  # noqa: BLE001 - only used to stop waiting early
        return 0


def release_orphaned_placement_groups() -> int:
    """Remove this job's placement groups whose creator actor has died; returns how many.

    Ray keeps a placement group until its creator actor *and* its job are both gone. A Ray Train controller that
    dies without cleaning up (Tune kills a finished trial's actor first; a fit's driver task is OOM-killed and
    retried) leaves its workers' group behind for the rest of the job with its CPUs reserved, and on a small
    cluster the next fit or the inference actors then wait forever. Only groups of this job whose creator actor
    is dead are touched: no live actor can use them. Where Ray's private GCS accessor differs (another Ray
    version) it warns and removes nothing.
    """
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:
        orphans = [pg for pg in _job_actor_placement_groups()
                   if pg.creator_actor_dead or _actor_dead(pg.creator_actor_id)]
    except Exception as e:  # noqa: BLE001 - a clean-up must never fail a run
        warnings.warn(f"could not look for orphaned placement groups ({type(e).__name__}: {e})", stacklevel=2)
        return 0
    removed = 0
    for pg in orphans:
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            removed += 1
        except Exception:  # noqa: BLE001 - removed meanwhile
            pass
    return removed


@contextlib.contextmanager
def orphans_released(every_s: float = 2.0, settle_s: float = 10.0):
    """Within the block (a Tune sweep), remove this job's placement groups whose creator actor died every
    ``every_s`` seconds from a driver thread, and for up to ``settle_s`` after the block (a killed actor is
    marked dead a moment later): the backup of Ray Train's own cleaner (see the module's docstring)."""
    stop = threading.Event()

    def reap():
        while not stop.wait(every_s):
            release_orphaned_placement_groups()

    thread = threading.Thread(target=reap, name="cact-orphan-reaper", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        deadline = time.time() + settle_s
        while True:
            release_orphaned_placement_groups()
            if not actor_placement_groups() or time.time() > deadline:
                break
            time.sleep(1.0)
