"""Peak memory and throughput of a long-tailed split build from an ImageNet-LT-sized source.

Writes a synthetic Parquet image table (default 1000 classes x 1200 train rows = 1.2M rows, 50 test rows per
class; every payload a real 8x8 JPEG of ~0.3 KB, so the build's corrupt-image check decodes each written
image; labels interleaved at random so every row group holds selected rows), then builds an exponential
IF=256 split from it (ImageNet-LT's n_max/n_min = 1280/5) in a fresh child process, in that process
(``executor="local"``), and reports the child's peak RSS (``VmHWM``), wall time and rows per second. A second
build into the same folder shows the reuse path (plan + checksum check, no writes). Then the same build with
Ray Data tasks writing the shards, on a local Ray cluster of 1 and of 2 CPUs (``--ray-cpus``): wall time,
the driver's peak RSS, and whether the files are byte-identical to the in-process build. The alternative, in a third child: load both tables whole with
pyarrow, select the same rows with NumPy, write the splits (what a short script would do).

    .venv/bin/python benchmarks/longtail_memory.py                       # full size (about 2 minutes)
    .venv/bin/python benchmarks/longtail_memory.py --classes 100 --json out.json
    .venv/bin/python benchmarks/longtail_memory.py --real-data ../shared/data   # also time the real datasets

The synthetic source is written under ``--workdir`` (default: a temporary folder, removed at the end unless
``--keep``). Results go in docs/BENCHMARKS.md, section "Long-tailed split build: memory and throughput".
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 2 * 1024**3


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def tiny_jpegs(n: int, seed: int = 0) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=75)
        out.append(buf.getvalue())
    return out


def write_source(root: Path, classes: int, train_per_class: int, test_per_class: int, seed: int = 0) -> dict:
    """Stream the synthetic table to ``root/{train,test}.parquet`` in 64k-row groups (bounded memory)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    pool = tiny_jpegs(256, seed)
    rng = np.random.default_rng(seed)
    meta = {b"classes": json.dumps([f"c{k:04d}" for k in range(classes)]).encode()}
    sizes = {}
    for name, per in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(classes, dtype=np.int64), per)
        rng.shuffle(labels)
        schema = pa.schema([("image", pa.binary()), ("label", pa.int64())], metadata=meta)
        path = root / f"{name}.parquet"
        # No dictionary, no compression, unique bytes per row: the file is as large as the payloads, like
        # real JPEGs (a repeated pool of values would collapse to a few KiB and measure nothing).
        with pq.ParquetWriter(path, schema, use_dictionary=False, compression="none") as w:
            for s in range(0, len(labels), 65536):
                lab = labels[s: s + 65536]
                pick = rng.integers(0, len(pool), size=len(lab))
                # Bytes after the JPEG end-of-image marker are ignored by decoders: a unique 8-byte tail.
                img = pa.array([pool[j] + (s + i).to_bytes(8, "little") for i, j in enumerate(pick)], pa.binary())
                w.write_table(pa.table({"image": img, "label": lab}, schema=schema), row_group_size=65536)
        sizes[name] = {"rows": int(len(labels)), "bytes": path.stat().st_size}
    return sizes


def child(config: dict) -> None:
    """Run one build and print its measurements as JSON (runs in a fresh interpreter). ``ray_cpus`` in the
    config: start a local Ray cluster of that many CPUs first (timed apart) and write the shards with Ray Data."""
    sys.path.insert(0, str(ROOT))
    rss0 = peak_rss_bytes()
    from stages.longtail import LongTailConfig, build

    ray_cpus, init_s = config.pop("ray_cpus", None), 0.0
    if ray_cpus:
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=ray_cpus, include_dashboard=False, log_to_driver=False)
        init_s = time.perf_counter() - t0
        config["executor"] = "ray"
    t0 = time.perf_counter()
    s = build(LongTailConfig(**config))
    wall = time.perf_counter() - t0
    out_bytes = sum(p.stat().st_size for p in Path(config["out"]).rglob("*") if p.is_file())
    print(json.dumps({"wall_s": wall, "ray_init_s": init_s, "peak_rss_bytes": peak_rss_bytes(),
                      "interpreter_rss_bytes": rss0, "totals": s.manifest["totals"], "n_max": s.manifest["n_max"],
                      "min_count": min(s.train_counts), "out_bytes": out_bytes,
                      "checksums": s.manifest["checksums"]["splits"]}))


def naive_child(config: dict) -> None:
    """The alternative: the usual script that loads both tables whole with pyarrow, selects the same rows with
    NumPy and writes the three splits (no image check, no manifest). Same counts as ``build``; prints JSON."""
    sys.path.insert(0, str(ROOT))
    rss0 = peak_rss_bytes()
    import numpy as np
    import pyarrow.parquet as pq

    from stages.longtail import _rng, class_rank, exponential_counts, largest_n_max

    t0 = time.perf_counter()
    src, out = Path(config["data_root"]), Path(config["out"])
    out.mkdir(parents=True, exist_ok=True)
    train, test = pq.read_table(src / "train.parquet"), pq.read_table(src / "test.parquet")
    y, yt = train["label"].to_numpy(), test["label"].to_numpy()
    K = int(max(y.max(), yt.max())) + 1
    IF = config["imbalance_factor"]
    counts = np.asarray(exponential_counts(largest_n_max(np.bincount(y, minlength=K).tolist(), "exponential", IF),
                                           K, IF))
    keep = class_rank(y, K) < counts[y]
    n_val = np.floor(0.2 * np.bincount(yt, minlength=K) + 0.5).astype(np.int64)
    is_val = class_rank(yt, K, _rng(0, 1)) < n_val[yt]
    totals = {}
    for name, table, mask in (("train", train, keep), ("val", test, is_val), ("pool", test, ~is_val)):
        part = table.filter(mask)
        pq.write_table(part, out / f"{name}.parquet")
        totals[name] = part.num_rows
    wall = time.perf_counter() - t0
    out_bytes = sum(p.stat().st_size for p in out.iterdir())
    print(json.dumps({"wall_s": wall, "peak_rss_bytes": peak_rss_bytes(), "interpreter_rss_bytes": rss0,
                      "totals": totals, "n_max": int(counts[0]), "min_count": int(counts.min()),
                      "out_bytes": out_bytes}))


def run_child(naive: bool = False, **config) -> dict:
    cmd = [sys.executable, __file__, "--naive-child" if naive else "--child", json.dumps(config)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"build failed ({config}):\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


REAL = {  # name: (LongTailConfig fields, path under the data folder)
    "CIFAR-10-LT IF=100 (JPEG Parquet)": (dict(dataset="parquet", imbalance_factor=100), "cifar10-jpeg"),
    "MNIST-LT IF=100 (idx.gz)": (dict(dataset="mnist", imbalance_factor=100), "mnist"),
    "Imagenette-LT IF=10 (ImageFolder)": (dict(dataset="imagefolder", imbalance_factor=10), "imagenette2-128"),
    "20 Newsgroups-LT IF=10 (tarball)": (dict(dataset="newsgroups", imbalance_factor=10), "20news-bydate.tar.gz"),
}


def real_data(data: Path, work: Path) -> dict:
    out = {}
    for name, (cfg, rel) in REAL.items():
        if not (data / rel).exists():
            continue
        r = run_child(**cfg, data_root=str(data / rel), out=str(work / "real" / rel))
        out[name] = r
        print(f"{name}: {r['wall_s']:.1f} s, peak RSS {r['peak_rss_bytes'] / 1024**2:.0f} MiB, {r['totals']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--train-per-class", type=int, default=1200)
    ap.add_argument("--test-per-class", type=int, default=50)
    ap.add_argument("--imbalance-factor", type=float, default=256)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic source and the split folder")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--real-data", type=Path, default=None,
                    help="folder like ../shared/data: also time builds of the real datasets found there")
    ap.add_argument("--skip-naive", action="store_true", help="do not run the in-memory pyarrow alternative")
    ap.add_argument("--ray-cpus", type=int, nargs="*", default=[1, 2],
                    help="also build with Ray Data on a local cluster of each of these CPU counts")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--naive-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if args.naive_child:
        naive_child(json.loads(args.naive_child))
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cact-longtail-bench-"))
    try:
        t0 = time.perf_counter()
        sizes = write_source(work / "source", args.classes, args.train_per_class, args.test_per_class)
        gen_s = time.perf_counter() - t0
        out = work / "splits"
        shutil.rmtree(out, ignore_errors=True)
        cfg = dict(dataset="parquet", data_root=str(work / "source"), out=str(out),
                   imbalance_factor=args.imbalance_factor)
        first = run_child(**cfg, executor="local")
        reuse = run_child(**cfg, executor="local")
        # The same build with Ray Data writing the shards, on a local cluster of 1 and of 2 CPUs.
        parallel = {}
        for n in args.ray_cpus:
            shutil.rmtree(work / f"splits-ray{n}", ignore_errors=True)
            r = run_child(**{**cfg, "out": str(work / f"splits-ray{n}")}, ray_cpus=n)
            r["identical_to_in_process"] = r["checksums"] == first["checksums"]
            parallel[str(n)] = r
        src_rows = sizes["train"]["rows"] + sizes["test"]["rows"]
        written = sum(first["totals"].values())
        result = {"machine": f"{os.cpu_count()} CPUs", "source": sizes, "generate_s": round(gen_s, 1),
                  "imbalance_factor": args.imbalance_factor, "build": first, "reuse": reuse,
                  "source_rows_per_s": round(src_rows / first["wall_s"]),
                  "written_rows_per_s": round(written / first["wall_s"]),
                  "ray": parallel,
                  "under_2_gib": all(r["peak_rss_bytes"] < LIMIT_BYTES for r in (first, reuse, *parallel.values()))}
        mib = 1024**2
        print(f"source: {src_rows:,} rows ({sum(v['bytes'] for v in sizes.values()) / mib:.0f} MiB), "
              f"generated in {gen_s:.1f} s")
        print(f"build:  {first['wall_s']:.1f} s, peak RSS {first['peak_rss_bytes'] / mib:.0f} MiB "
              f"(interpreter {first['interpreter_rss_bytes'] / mib:.0f} MiB), written {first['totals']} "
              f"({first['out_bytes'] / mib:.0f} MiB), n_max {first['n_max']}, min class {first['min_count']}")
        print(f"        {result['source_rows_per_s']:,} source rows/s, {result['written_rows_per_s']:,} written rows/s")
        print(f"reuse:  {reuse['wall_s']:.1f} s, peak RSS {reuse['peak_rss_bytes'] / mib:.0f} MiB")
        for n, r in parallel.items():
            print(f"Ray Data, {n} CPU(s): {r['wall_s']:.1f} s (+ {r['ray_init_s']:.1f} s to start Ray), "
                  f"{written / r['wall_s']:,.0f} written rows/s, driver peak RSS {r['peak_rss_bytes'] / mib:.0f} MiB, "
                  f"files identical to the in-process build: {r['identical_to_in_process']}")
        print(f"peak RSS under 2 GiB: {result['under_2_gib']}")
        if not args.skip_naive:
            shutil.rmtree(work / "naive", ignore_errors=True)
            naive = run_child(naive=True, **{**cfg, "out": str(work / "naive")})
            result["naive"] = naive
            if naive["totals"] != first["totals"]:
                print(f"WARNING: the in-memory alternative wrote {naive['totals']}, ours {first['totals']}")
            print(f"alternative (whole tables in memory with pyarrow, select, write; no image check): "
                  f"{naive['wall_s']:.1f} s, peak RSS {naive['peak_rss_bytes'] / mib:.0f} MiB; "
                  f"ours / alternative: memory {first['peak_rss_bytes'] / naive['peak_rss_bytes']:.2f}, "
                  f"time {first['wall_s'] / naive['wall_s']:.2f}")
        if args.real_data:
            result["real"] = real_data(args.real_data, work)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        if not result["under_2_gib"]:
            sys.exit(1)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
