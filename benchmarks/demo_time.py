"""The main job's wall time: ``make demo`` (digits-LT, six methods, local mode: the demo's default)
against the same command with a Ray Train worker group (``--num-workers 1``), each run a fresh process and a
fresh run folder, the two interleaved ``--repeats`` times on one local Ray per run (``--address local``).

    python benchmarks/demo_time.py --repeats 2 --json OUT/demo.json

Wall time of the whole process (imports, Ray start, every stage, exit), as a user waits for it; the stage clocks
the pipeline prints (``== stage (stage X s``) go to the JSON too. Medians over the repeats.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"local": [], "group": ["--num-workers", "1"]}  # the default, and a worker group of one


def run_demo(extra: list[str]) -> dict:
    out = Path(tempfile.mkdtemp(prefix="cact-demo-time-"))
    shutil.rmtree(out)  # the pipeline creates it: nothing to reuse
    argv = [sys.executable, "pipelines/digits_lt.py", "--out", str(out), "--address", "local", *extra]
    try:
        t0 = time.perf_counter()
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}"
                             f"{proc.stderr[-2000:]}")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    stages = {m.group(1): float(m.group(2)) for m in re.finditer(r"^== (.+?) \(stage ([\d.]+)s", proc.stdout, re.M)}
    return {"wall_s": wall, "stages_s": stages}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args(argv)
    runs = {v: [] for v in VARIANTS}
    for r in range(a.repeats):
        for v in (VARIANTS if r % 2 == 0 else reversed(list(VARIANTS))):
            res = run_demo(VARIANTS[v])
            runs[v].append(res)
            print(f"repeat {r} {v:5s}: {res['wall_s']:.1f} s  " +
                  ", ".join(f"{k} {s:.1f}" for k, s in res["stages_s"].items()), flush=True)
    med = {v: statistics.median(x["wall_s"] for x in xs) for v, xs in runs.items()}
    stages = {v: {k: statistics.median(x["stages_s"].get(k, float("nan")) for x in xs) for k in xs[0]["stages_s"]}
              for v, xs in runs.items()}
    result = {"wall_s": med["local"], "group_wall_s": med["group"], "stages_s": stages["local"],
              "group_stages_s": stages["group"], "repeats": a.repeats, "runs": runs,
              "commands": {v: "python pipelines/digits_lt.py --out DEMO_OUT --address local" +
                           "".join(f" {x}" for x in VARIANTS[v]) for v in VARIANTS}}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"demo (local mode): {med['local']:.1f} s; with a worker group (--num-workers 1): {med['group']:.1f} s "
          f"(median of {a.repeats})")


if __name__ == "__main__":
    main()
