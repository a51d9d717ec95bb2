"""Two Ray nodes on one machine: a head (``ray start --head``) and a second node (``ray start --address``) with
a resource label of its own. A driver process on that cluster builds the splits with Ray Data shard tasks on
both nodes and trains CaCT with one Ray Train worker pinned on each node (``STRICT_SPREAD``); the results must be
those of a single machine: the same split files, byte for byte, and the model and multipliers of one process.
Only the processes this test started are stopped (by their ids and the cluster's marker), never ``ray stop``.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from stages import longtail, train
from tests.stages.test_longtail import tree
from tests.stages.test_train import TWO_WORKER_LOOP, assert_two_workers_equal_one_process

from ._ray_head import RayHead

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("_two_node_driver.py")


@pytest.mark.ray
def test_two_nodes_build_and_train_what_one_machine_does(tmp_path):
    t0 = time.monotonic()
    head = RayHead(num_cpus=1, extra_env={"PYTHONPATH": str(REPO)}, log_path=tmp_path / "ray-start.log")
    try:
        head.start(timeout=120, jobs_api=False)
        t_up = time.monotonic() - t0
        head.add_node(num_cpus=1, resources={"second_node": 1})
        run = subprocess.run([sys.executable, str(DRIVER), str(tmp_path), json.dumps(TWO_WORKER_LOOP.to_dict())],
                             env=head.env, capture_output=True, text=True, timeout=480)
    finally:
        t_run = time.monotonic() - t0
        killed = head.stop()
        remaining = head.remaining_pids()
        head.cleanup()
    assert run.returncode == 0, f"driver failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    assert not remaining, f"processes of the test's cluster still alive after stop: {remaining} (killed {killed})"

    seen = json.loads((tmp_path / "driver.json").read_text())
    print(f"\nhead up {t_up:.1f} s, driver done {t_run:.1f} s, stopped {time.monotonic() - t0:.1f} s; driver "
          f"(cumulative): {seen['seconds']}")
    assert len(seen["nodes"]) == 2
    assert sorted(seen["worker_nodes"]) == seen["nodes"], seen  # one training worker on each node
    # Ray Data shard tasks ran on both nodes, and the files are those this process writes alone.
    assert re.search(r"split build: pool: 717 rows in 12 shard\(s\), .* written by ray on 2 node\(s\)", run.stderr), \
        run.stderr[-3000:]
    splits = longtail.load(tmp_path / "splits")
    local = longtail.build(longtail.LongTailConfig(out=str(tmp_path / "local"), imbalance_factor=10, shard_rows=64,
                                                   executor="local"))
    assert tree(splits.root) == tree(local.root)
    method_dir = Path(seen["method_dir"])
    result = types.SimpleNamespace(method_dir=method_dir, model_path=Path(seen["model_path"]),
                                   history_path=method_dir / "history.parquet", final_metrics={"eta": seen["eta"]})
    stage = train.TrainStageConfig(out=str(tmp_path / "reference"), loop=TWO_WORKER_LOOP, num_workers=2,
                                   model_family="linear", data_order="global")
    assert_two_workers_equal_one_process(result, splits, stage)
