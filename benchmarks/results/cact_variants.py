"""Each choice of the faithful-CaCT fix measured against the CE fine-tune control, on one dataset and seed.

    python benchmarks/results/cact_variants.py run --pipeline newsgroups --data-root DATA --seed 0 --out OUT
    python benchmarks/results/cact_variants.py table OUT1 OUT2 ...    # paired differences over seeds
    python benchmarks/results/cact_variants.py gap OUT1 ...           # validation vs training soft size
    python benchmarks/results/cact_variants.py collect OUT DEST       # the small files the tables read

``run``: the dataset's pipeline with its default methods (ce, ce_finetune, conftr, conftr_class, cact_uniform,
cact) into OUT/base, then CaCT fine-tuned again from the same CE backbone with one choice changed at a time
(each in OUT/variants/<name>, its pool logits copied to OUT/base/logits/cact[<name>]), then the evaluation of
every method and variant on the same R = 20 calibration/test splits, paired split by split against
``ce_finetune`` (eval/per_split.parquet). ``table`` prints, per (method, shot group), the mean paired difference
against ``ce_finetune`` over the seeds' split means with a 95% Student-t interval over seeds.
Paths come from flags; nothing here is machine-specific.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# One choice changed at a time against the new defaults (cal_weighting=balanced, reduction=class,
# eta_relative=0.9, a dual step per epoch, rho_step=2); "old" is the method as first built.
VARIANTS = {
    "cal=none": {"cal_weighting": "none"},
    "reduction=sample": {"reduction": "sample"},
    "eta=1.2": {"eta_relative": None, "eta": 1.2},
    "dual4": {"dual_every_steps": -4},  # four dual steps per epoch (resolved from the steps per epoch)
    "old": {"cal_weighting": "none", "reduction": "sample", "eta_relative": None, "eta": 1.2, "rho_step": 10},
}


def run(args: argparse.Namespace) -> None:
    out = Path(args.out).resolve()
    base = out / "base"
    cmd = [sys.executable, str(ROOT / "pipelines" / f"{args.pipeline}_lt.py"), "--seed", str(args.seed),
           "--out", str(base), "--imbalance-factor", str(args.imbalance_factor), "--address", "local",
           *(["--data-root", args.data_root] if args.data_root else []), *args.extra]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    base_seconds = time.time() - t0

    import ray

    from cact_ops.training import TrainConfig
    from stages import evaluate, infer, longtail, train

    config = json.loads((base / "config.json").read_text())
    loop = TrainConfig(**{**config["loop"], "milestones": tuple(config["loop"]["milestones"])})
    stage = {k: v for k, v in config["stage"].items() if k != "overwrite"}
    finetune_epochs = config["args"]["finetune_epochs"]
    splits = longtail.load(base / "splits")
    ray.init(address="local", log_to_driver=False)
    ce = train.fit_methods(splits, str(base), ("ce",), loop=loop, **stage)["ce"]
    assert ce.reused, "the CE backbone must be the pipeline's"
    steps_per_epoch = math.ceil(sum(splits.manifest["counts"]["train"]) / loop.batch_size)
    timings = {}
    for name in args.variants.split(","):
        change = dict(VARIANTS[name])
        if change.get("dual_every_steps", 0) < 0:
            change["dual_every_steps"] = max(1, steps_per_epoch // -change["dual_every_steps"])
        vdir = out / "variants" / name
        t1 = time.time()
        res = train.fit_methods(splits, str(vdir), ("cact",), loop=dataclasses.replace(loop, **change),
                                finetune_epochs=finetune_epochs, backbone=ce, **stage)
        infer.run(infer.InferConfig(run_dir=vdir, splits_root=splits.root, methods=("cact",), splits=("pool",)))
        timings[name] = round(time.time() - t1, 1)
        dest = base / "logits" / f"cact[{name}]"
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(vdir / "logits" / "cact" / "pool.parquet", dest / "pool.parquet")
        (dest / "variant.json").write_text(json.dumps({"change": change, "lambda_max": res["cact"].final_metrics.get(
            "lambda_max"), "eta": res["cact"].final_metrics.get("eta")}))
    ray.shutdown()
    ev = evaluate.run(evaluate.EvalConfig(run_dir=base, alphas=(0.1, 0.05), n_splits=20, seed=args.seed))
    (out / "run.json").write_text(json.dumps({"command": sys.argv, "pipeline_seconds": round(base_seconds, 1),
                                              "variant_seconds": timings, "summary": str(ev.summary_path)}))
    print(f"done: {ev.summary_path}")


def table(outs: list[str], score: str, predictor: str, alpha: float, control_predictor: str | None = None) -> str:
    """Markdown: paired difference (method - ce_finetune) per shot group, with a 95% Student-t interval over the
    replicates: the seeds (each the mean over its splits) when there are several, the R splits of one seed
    otherwise. ``control_predictor``: the control evaluated with another predictor (e.g. class-wise CP)."""
    import polars as pl

    from cact_ops.methods import order_key
    from cact_ops.metrics import paired_difference

    metrics = ("size", "covgap", "many_size", "medium_size", "few_size", "coverage", "accuracy")
    frames = [pl.read_parquet(Path(o) / "base" / "eval" / "per_split.parquet").filter(
        (pl.col("score") == score) & ((pl.col("alpha") - alpha).abs() < 1e-9)) for o in outs]
    if len(frames) == 1:  # replicates: the splits
        rows = frames[0].sort("split")
    else:  # replicates: the seeds, each the mean over its splits
        rows = pl.concat([f.group_by("method", "predictor").agg([pl.col(m).mean() for m in metrics])
                          .with_columns(pl.lit(i).alias("replicate")) for i, f in enumerate(frames)]).sort("replicate")
    control = rows.filter((pl.col("method") == "ce_finetune")
                          & (pl.col("predictor") == (control_predictor or predictor)))
    methods = sorted(set(rows["method"]) - (set() if control_predictor else {"ce_finetune"}), key=order_key)
    lines = ["| method | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for m in methods:
        values = rows.filter((pl.col("method") == m) & (pl.col("predictor") == predictor))
        cells = []
        for k in metrics:
            mean, lo, hi = paired_difference(values[k].to_numpy(), control[k].to_numpy())
            if math.isnan(mean):
                cells.append("–")
                continue
            txt = f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            cells.append(f"**{txt}**" if lo > 0 or hi < 0 else txt)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gap(outs: list[str]) -> str:
    """Markdown: CaCT's validation vs training soft size (last epoch, mean over classes and over the few-shot
    third), with and without balanced calibration weights, and the largest multiplier."""
    import polars as pl

    lines = ["| run | variant | val soft size | train soft size | ratio | few-shot val / train | lambda max |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for o in outs:
        for name, path in (("cact", Path(o) / "base" / "train" / "cact"),
                           *((f"cact[{v}]", Path(o) / "variants" / v / "train" / "cact") for v in VARIANTS)):
            if not (path / "history.parquet").is_file():
                continue
            h = pl.read_parquet(path / "history.parquet")
            if "train_soft_size" not in h.columns:
                continue
            last = h.filter(pl.col("epoch") == h["epoch"].max()).sort("class")
            k = last.height
            few = last.tail(max(1, k // 3))  # classes are ordered head to tail
            v, t = last["val_soft_size"].mean(), last["train_soft_size"].mean()
            lines.append(f"| {Path(o).name} | {name} | {v:.3f} | {t:.3f} | {v / t:.2f} | "
                         f"{few['val_soft_size'].mean():.3f} / {few['train_soft_size'].mean():.3f} | "
                         f"{last['lambda'].max():.3g} |")
    return "\n".join(lines)


KEEP = ("run.json", "base/config.json", "base/eval/summary.csv", "base/eval/per_split.parquet",
        "base/splits/manifest.json", "base/train/*/history.parquet", "base/train/*/metrics.parquet",
        "base/logits/*/variant.json", "variants/*/train/cact/history.parquet", "variants/*/train/cact/metrics.parquet")


def collect(out: str, dest: str) -> None:
    """Copy what the tables need (small files; no models or logits) from a run folder into ``dest``, keeping the
    layout, so ``table`` and ``gap`` read the committed copy as they read the run."""
    src, dst = Path(out), Path(dest)
    for pattern in KEEP:
        for f in src.glob(pattern):
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--pipeline", required=True, choices=("digits", "mnist", "newsgroups", "cifar10"))
    r.add_argument("--data-root", default=None)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--imbalance-factor", type=float, default=10)
    r.add_argument("--out", required=True)
    r.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    r.add_argument("extra", nargs="*", help="more pipeline flags, after --")
    t = sub.add_parser("table")
    t.add_argument("outs", nargs="+")
    t.add_argument("--score", default="aps")
    t.add_argument("--predictor", default="standard")
    t.add_argument("--alpha", type=float, default=0.1)
    t.add_argument("--control-predictor", default=None, choices=("standard", "classwise"),
                   help="compare with ce_finetune under this predictor (default: the same as --predictor)")
    g = sub.add_parser("gap")
    g.add_argument("outs", nargs="+")
    c = sub.add_parser("collect")
    c.add_argument("out")
    c.add_argument("dest")
    a = p.parse_args()
    if a.cmd == "run":
        run(a)
    elif a.cmd == "gap":
        print(gap(a.outs))
    elif a.cmd == "collect":
        collect(a.out, a.dest)
    else:
        print(table(a.outs, a.score, a.predictor, a.alpha, a.control_predictor))


if __name__ == "__main__":
    main()
