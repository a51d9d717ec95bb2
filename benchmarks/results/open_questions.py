"""Two of the paper's open questions, measured on a finished pipeline run (Marani et al., Class Adaptive
Conformal Training, arXiv 2601.09522).

``temperature``: how far the smooth quantities that training sees are from the hard ones that CP uses, as a
function of the soft-set temperature T. On a run's validation logits (``logits/<method>/val.parquet``) it repeats
the dual step's protocol: a stratified 20% calibration part gives the hard threshold tau on the log-probability
conformity score at the training alpha; on the other 80% it reports the hard set size and coverage and the smooth
ones, sum_k sigmoid((E(x,k) - tau)/T) and sigmoid((E(x,y) - tau)/T), for several T. No training.

``refit``: fine-tunes one method again from the run's CE backbone with some ``TrainConfig`` fields changed
(``--set temperature=0.25 --set eta=0.6``) and every other field of the run's own config for that method, into a
new run folder that shares the splits; then inference and the same evaluation (R splits, alphas). This is how T
is varied *in training*, and how the multipliers are estimated on the training set instead of D_val
(``--set dual_source=train``; ``dual-source`` is the old name of exactly that refit).

    python benchmarks/results/open_questions.py temperature RUNS/mnist-lt-if100-seed0
    python benchmarks/results/open_questions.py refit RUNS/newsgroups-lt-if10-seed0 \
        --set temperature=0.25 --out RUNS/newsgroups-lt-if10-seed0-T0.25 --save newsgroups-if10-s0-T0.25

(RUNS: the folder the runs were made in, outside the repo; ``--save`` records into measured/<name>/, which
``tables.py`` turns into benchmarks/results/TABLES.md.)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
MEASURED = Path(__file__).resolve().parent / "measured"


def temperature(run: Path, methods: list[str], temps: list[float], alpha: float, fraction: float, seed: int) -> str:
    import torch

    from cact_ops.scores import logprob
    from cact_ops.cp import conformal_quantile
    from cact_ops.training import val_cal_mask
    from stages.evaluate import read_logits

    lines = [f"| method | T | hard coverage | smooth coverage | hard size | smooth size | smooth − hard size |",
             "|---|---|---|---|---|---|---|"]
    for method in methods:
        p = read_logits(run / "logits" / method / "val.parquet")
        conf = logprob(p.logits.double())
        y = p.labels.long()
        cal = val_cal_mask(y, fraction, seed)
        tau = -float(conformal_quantile(-conf[cal].gather(1, y[cal, None]).squeeze(1), alpha))
        rest, yr = conf[~cal], y[~cal]
        hard = rest >= tau
        hcov = float(hard.gather(1, yr[:, None]).double().mean())
        hsize = float(hard.sum(1).double().mean())
        for t in temps:
            soft = torch.sigmoid((rest - tau) / t)
            scov = float(soft.gather(1, yr[:, None]).mean())
            ssize = float(soft.sum(1).mean())
            lines.append(f"| {method} | {t:g} | {hcov:.3f} | {scov:.3f} | {hsize:.2f} | {ssize:.2f} | {ssize - hsize:+.2f} |")
    return "\n".join(lines)


def parse_overrides(items: list[str]) -> dict:
    """``["eta=0.6", "dual_source=train"]`` -> ``{"eta": 0.6, "dual_source": "train"}`` (JSON values, else text);
    names are checked against TrainConfig so that a typo fails before any training."""
    from cact_ops.training import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--set {item!r}: expected NAME=VALUE with NAME a TrainConfig field ({sorted(fields)})")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def refit(run: Path, out: Path, method: str, overrides: dict) -> dict:
    import ray

    from cact_ops.training import TrainConfig
    from stages import evaluate, infer, train

    if method == "ce":
        raise SystemExit("refit: ce is the backbone, trained from scratch; refit a method fine-tuned from it")
    src = json.loads((run / "train" / method / "config.json").read_text())
    cfg = json.loads((run / "config.json").read_text())
    loop = TrainConfig(**{**src["loop"], **overrides})
    stage = {k: v for k, v in src.items() if k in {f.name for f in dataclasses.fields(train.TrainStageConfig)}}
    stage.update(out=str(out), loop=loop, storage_path=None, run_name=None, overwrite=True)
    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False)
    t0 = time.time()
    splits = run / "splits"
    res = train.fit(str(splits), train.TrainStageConfig(**stage))
    infer.run(infer.InferConfig(run_dir=out, splits_root=splits, methods=(method,)))
    ev = evaluate.run(evaluate.EvalConfig(run_dir=out, splits_root=splits, methods=(method,),
                                          alphas=tuple(cfg["args"]["alpha"]), n_splits=cfg["args"]["n_splits"],
                                          seed=cfg["args"]["seed"], report=False))
    return {"wall_s": round(time.time() - t0, 1), "summary": str(ev.summary_path), "train": str(res.model_path),
            "base_run": str(run), "method": method, "overrides": overrides}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("temperature")
    t.add_argument("run", type=Path)
    t.add_argument("--methods", default="ce,conftr,cact")
    t.add_argument("--temperatures", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0, 2.0])
    t.add_argument("--alpha", type=float, default=0.1)
    t.add_argument("--fraction", type=float, default=0.2)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save", default=None, help="write the table to measured/<name>/temperature.md")
    for name in ("refit", "dual-source"):
        d = sub.add_parser(name)
        d.add_argument("run", type=Path)
        d.add_argument("--out", type=Path, required=True)
        d.add_argument("--method", default="cact")
        d.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                       help="TrainConfig field to change (repeatable)")
        d.add_argument("--save", default=None, help="copy the summary to measured/<name>/")
    a = p.parse_args(argv)
    if a.cmd == "temperature":
        text = temperature(a.run, a.methods.split(","), a.temperatures, a.alpha, a.fraction, a.seed)
        print(text)
        if a.save:
            (MEASURED / a.save).mkdir(parents=True, exist_ok=True)
            (MEASURED / a.save / "temperature.md").write_text(text + "\n")
        return 0
    overrides = parse_overrides(a.overrides + (["dual_source=train"] if a.cmd == "dual-source" else []))
    info = refit(a.run, a.out, a.method, overrides)
    print(json.dumps(info))
    if a.save:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from run_quality import collect

        import datetime as dt

        collect(a.save, a.out, None, {**info, "command": "benchmarks/results/open_questions.py " + " ".join(sys.argv[1:]),
                                      "end_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
