"""Driver of the two-node test (``test_two_nodes.py``), run as its own process against the cluster in
``RAY_ADDRESS``: builds the digits splits with Ray Data shard tasks and trains one method with one Ray Train
worker pinned on each node (``STRICT_SPREAD``), then writes where the workers ran as JSON.

    python tests/pipelines/_two_node_driver.py WORK_DIR TRAIN_CONFIG_JSON
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(work: Path, loop: dict) -> None:
    t0 = time.monotonic()
    import ray

    ray.init(log_to_driver=False)
    times = {"init": time.monotonic() - t0}
    deadline = time.monotonic() + 90
    while sum(1 for n in ray.nodes() if n["Alive"]) < 2:
        if time.monotonic() > deadline:
            raise SystemExit(f"the second node did not join in 90 s: {ray.nodes()}")
        time.sleep(0.5)

    times["second node"] = time.monotonic() - t0
    from ray.util.state import list_actors

    from stages import longtail, train

    splits = longtail.build(longtail.LongTailConfig(out=str(work / "splits"), imbalance_factor=10, shard_rows=64,
                                                    executor="ray"))
    stage = train.TrainStageConfig(out=str(work / "run"), loop=loop, num_workers=2, model_family="linear",
                                   data_order="global", placement_strategy="STRICT_SPREAD", verbose=False)
    times["splits"] = time.monotonic() - t0
    result = train.fit(splits, stage)
    times["fit"] = time.monotonic() - t0
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=100)
    (work / "driver.json").write_text(json.dumps({
        "nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
        "worker_nodes": sorted(a.node_id for a in workers),
        "model_path": str(result.model_path), "method_dir": str(result.method_dir),
        "eta": result.final_metrics["eta"], "seconds": times}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(sys.argv[2]))
