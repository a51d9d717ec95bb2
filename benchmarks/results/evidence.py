"""The decisive protocol (issue 13): converged backbones, frozen features, each method's size knob swept, >= 5
training seeds x R = 20 calibration/test splits, paired comparisons and a verdict per (dataset, IF).

Per (dataset, IF, seed), in one process and without Ray (the library, as a user's own loop would call it):
1. the long-tailed splits (``stages.longtail``; D_val is a stratified 20% of the official test split);
2. a converged backbone trained once with CE (``cact_ops.training.fit_in_process``): 20 Newsgroups a TF-IDF MLP
   (``tfidf``: idf and vocabulary fit on the training split only), MNIST the ``lenet``, CIFAR-10 ResNet-32
   (``BACKBONES``; on a GPU, or on CPU cores in bf16);
3. its penultimate features (``cact_ops.models.penultimate_features``, what ``stages.features`` writes);
4. heads on the features, with DeepMind's ConfTr CIFAR-10 settings (``stages.features.REFERENCE_HEAD``: batch
   500, lr 0.01, T = 1, ConfTr lambda 0.05 and log transform) for ``--head-finetune-epochs``: every method starts
   from the backbone's own converged last layer (``ce``: the backbone as trained) and ``ce_finetune`` (the control)
   trains it on with CE alone (``ce_finetune_la``: the same with post-hoc logit adjustment, the standard
   long-tail correction; ``cact_la``: CaCT's heads with the same correction); each conformal method at every
   value of its own size knob (ConfTr and
   ConfTr-class: lambda; CaCT and CaCT-uniform: eta_relative). Not a re-initialised head trained for 50 epochs
   as in the reference: on these features that head stays under-trained (0.53 accuracy against the backbone's
   0.65 on 20 Newsgroups-LT IF 10, seed 0: this script's ``run`` at commit 61e05b1, which trained it that way), and any method that trains it harder wins (the confound this protocol
   exists to remove);
5. hard split CP of every head's logits: on the pool over R = 20 random halves (``cact_ops.engine``), and on
   D_val over 10 halves (what the D_val-selected point is chosen on: the smallest mean APS set at alpha = 0.1).

``run`` writes ``<out>/<dataset>-if<IF>/seed<seed>.parquet`` (one row per head x score x predictor x split:
method, knob, value, split, coverage, size, covgap (points), tail_size (the mean set size of the rarest third
of the classes), accuracy, where = pool|val) and ``backbone``
facts to ``seed<seed>.json``; a finished seed is skipped on a rerun. ``report`` reads them all and prints the
verdict table and the fronts (Markdown), from files only: same files, same text.

    python benchmarks/results/evidence.py run --dataset newsgroups --data-root DATA/20news-bydate.tar.gz \\
        --imbalance-factor 10 --seeds 0 1 2 3 4 --out benchmarks/results/measured/evidence --work WORK
    python benchmarks/results/evidence.py report --out benchmarks/results/measured/evidence
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

# Backbones: a dataset's model family and CE protocol (TrainConfig fields), trained once per seed.
BACKBONES = {
    "newsgroups": {"family": "tfidf", "loop": {"epochs": 8, "batch_size": 64, "lr": 1e-3, "optimizer": "adamw",
                                               "weight_decay": 1e-4}},
    # LeNet with 2-pixel shifts, 30 epochs at batch 64: 0.9725 on MNIST-LT IF 100, seed 0, in 198 s on one core
    # (12 epochs at batch 128: 0.962 over seeds 0-4, commit b513ddb; 30 at batch 128: 0.969 on seed 0; the
    # SmallCNN: 0.947 in 15 epochs and ~9 min, commit 61e05b1)
    "mnist": {"family": "lenet", "loop": {"epochs": 30, "batch_size": 64, "lr": 0.05, "optimizer": "sgd",
                                          "weight_decay": 5e-4, "augment": "crop"}},
    # ResNet-32 with the LDAM schedule (Cao et al. 2019) cut to 80 epochs at batch 256 and lr 0.2 (milestones at
    # the same fractions, 0.8 and 0.9): a GPU backbone, all 15 (IF, seed) runs in one short lease
    # (evidence_backbones_gpu.sh); 100 epochs at batch 128 reached 0.639 on IF 100, seed 0
    # (benchmarks/results/measured/gpu/cifar10_lt_direct.json). On 2 CPU cores in bf16 (amp_cpu): 0.651 and 0.643
    # on IF 100, seeds 0 and 1, in 34.7 min each (benchmarks/results/measured/cpu/cifar10-if100-backbones.json)
    "cifar10": {"family": "cifar_resnet32", "loop": {"epochs": 80, "batch_size": 256, "lr": 0.2, "optimizer": "sgd",
                                                     "weight_decay": 2e-4, "schedule": "step", "warmup_epochs": 5,
                                                     "milestones": [64, 72], "augment": "crop_flip",
                                                     # bf16 on CPU too (CUDA has it by default): half the
                                                     # fp32 step time on an avx512_bf16 CPU
                                                     "amp_cpu": True,
                                                     # only the CE loop's logged soft-size diagnostics use it; this
                                                     # operator needs no torchsort (absent on a bare GPU machine)
                                                     "quantile_operator": "sigmoid"}},
}
# Each method's own size knob (TrainConfig field) and the values swept.
KNOBS = {
    "conftr": ("conftr_lambda", (0.01, 0.05, 0.2, 0.5, 1.0, 2.0)),
    "conftr_class": ("conftr_lambda", (0.01, 0.05, 0.2, 0.5, 1.0, 2.0)),
    "cact_uniform": ("eta_relative", (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)),
    "cact": ("eta_relative", (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)),
}
ALPHA = 0.1
SCORES = ("lac", "aps")
N_SPLITS, N_VAL_SPLITS = 20, 10
METRICS = ("accuracy", "coverage", "size", "covgap", "tail_size")


def _folder_name(dataset: str, imbalance_factor: float, val_fraction: float) -> str:
    """The measured folder (and scratch folder) of a (dataset, IF, D_val fraction)."""
    return f"{dataset}-if{imbalance_factor:g}" + (f"-vf{val_fraction:g}" if val_fraction != 0.2 else "")


def _tag(folder: Path, facts: dict) -> str:
    """A measured folder's variant tag (``run --tag``; '' for a protocol folder): what follows its name."""
    name = _folder_name(facts["dataset"], facts["imbalance_factor"], facts.get("val_fraction", 0.2))
    return folder.name.removeprefix(name).removeprefix("-")


def _splits(dataset: str, data_root: str, imbalance_factor: float, val_fraction: float, seed: int, work: Path):
    """The long-tailed splits of one seed (CIFAR-10 from the official pickles or the cifar10-jpeg Parquet copy)."""
    from stages import longtail

    source = "parquet" if dataset == "cifar10" and (Path(data_root) / "train.parquet").is_file() else dataset
    return longtail.build(longtail.LongTailConfig(dataset=source, data_root=data_root, out=str(work / f"splits-s{seed}"),
                                                  imbalance_factor=imbalance_factor, val_fraction=val_fraction,
                                                  seed=seed))


def _backbone(dataset: str, splits, seed: int, work: Path, device: str = "cpu", epochs: int | None = None,
              verbose: bool = False):
    """The CE backbone of one seed, trained once and cached in ``work`` (state dict, ``weights_only`` load) with
    its facts (seconds, device, loop, the training split's digest). A cached backbone trained on another split
    or with another loop (a smoke run's ``epochs``) is refused, so a measurement never uses it."""
    import torch

    from cact_ops.models import build_model
    from cact_ops.training import TrainConfig, fit_in_process
    from stages import payload
    from stages.train_run import TrainStageConfig, jsonable, model_spec  # no Ray or Polars: runs on a bare GPU machine

    spec = BACKBONES[dataset]
    loop = {**spec["loop"], **({"epochs": epochs} if epochs else {})}
    # the train stage's constructor arguments for this family and split folder (idf, input channels)
    built = model_spec(TrainStageConfig(out=str(work), model_family=spec["family"]), splits)
    torch.manual_seed(seed)
    model = build_model(built["family"], built["num_classes"], **built["kwargs"])
    path = work / f"backbone-s{seed}.pt"
    digest = splits.manifest["selection_digest"]["train"]
    if path.is_file():
        facts = json.loads(path.with_suffix(".json").read_text())
        for key, want in (("train_digest", digest), ("loop", jsonable(loop))):
            if facts.get(key, want) != want:
                raise ValueError(f"{path}: cached backbone has {key} {facts[key]!r}, this run needs {want!r}; "
                                 "remove it or use another --work")
        model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
        return model.eval(), facts
    dev = torch.device(device)
    # the whole split on the device once: a GPU step of these small models is bound by launches, not data
    train, val = (tuple(t.to(dev) for t in payload.read_split_tensors(splits, s)) for s in ("train", "val"))
    t0 = time.time()
    fit_in_process(model, TrainConfig(method="ce", seed=seed, **loop), train, val, device=device, verbose=verbose)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    facts = {"seconds": round(time.time() - t0, 1), "loop": loop, "train_digest": digest,
             "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{os.cpu_count()} CPU cores",
             "torch": torch.__version__}
    model = model.cpu()
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    path.with_suffix(".json").write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)  # the weights last: a backbone without its facts is never read
    return model.eval(), facts


def _features(model, x, batch: int = 512):
    import torch

    from cact_ops.models import penultimate_features

    feats, logits = [], []
    for i in range(0, len(x), batch):
        f, z = penultimate_features(model, x[i:i + batch])
        feats.append(f)
        logits.append(z)
    return torch.cat(feats), torch.cat(logits)


def _cp_rows(logits, labels, train_counts, n_splits: int, seed: int) -> list[dict]:
    from cact_ops import engine

    acc, results = engine.evaluate_pool(logits, labels, train_counts, scores=SCORES, alphas=(ALPHA,),
                                        n_splits=n_splits, seed=seed)
    # the tail: the rarest third of the classes (ImageNet-LT's few-shot group, < 20 images, is empty at IF 10)
    tail = np.argsort(-np.asarray(train_counts), kind="stable")[-math.ceil(len(train_counts) / 3):]
    rows = []
    for res in results:
        tail_size = res.metrics["class_size"][:, 0][:, tail].mean(1)
        for r in range(n_splits):
            rows.append({"score": res.score, "predictor": res.predictor, "split": r, "accuracy": float(acc[r]),
                         "coverage": float(res.metrics["coverage"][r, 0]), "size": float(res.metrics["size"][r, 0]),
                         "covgap": float(res.metrics["covgap"][r, 0]), "tail_size": float(tail_size[r]),
                         # per class, in class order: what the set size and coverage vs training count come from
                         "class_size": res.metrics["class_size"][r, 0].tolist(),
                         "class_coverage": res.metrics["class_coverage"][r, 0].tolist()})
    return rows


def run_seed(dataset: str, data_root: str, imbalance_factor: float, seed: int, out: Path, work: Path,
             val_fraction: float, head_finetune_epochs: int, methods: tuple[str, ...] | None = None,
             overrides: dict | None = None, tag: str = "") -> None:
    """One seed of the protocol. ``methods`` restricts the swept methods (default: every one of KNOBS);
    ``overrides`` sets TrainConfig fields of every conformal head (a check such as the smooth operator's
    strength); ``tag`` names such a variant's folder."""
    import polars as pl
    import torch

    from cact_ops.models import Head, last_linear
    from cact_ops.training import TrainConfig, fit_in_process
    from stages import payload
    from stages.features import REFERENCE_HEAD
    from stages.train import finetune_config

    name = _folder_name(dataset, imbalance_factor, val_fraction)
    work = work / name  # splits and backbones depend on the data only, not on a variant's tag
    name += f"-{tag}" if tag else ""
    target = out / name / f"seed{seed}.parquet"
    if target.is_file():
        print(f"{target}: done, skipped", flush=True)
        return
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    splits = _splits(dataset, data_root, imbalance_factor, val_fraction, seed, work)
    backbone, backbone_facts = _backbone(dataset, splits, seed, work)
    backbone_seconds = backbone_facts["seconds"]
    data = {s: payload.read_split_tensors(splits, s) for s in ("train", "val", "pool")}
    feats = {s: _features(backbone, data[s][0]) for s in data}
    backbone_acc = float((feats["pool"][1].argmax(1) == data["pool"][1]).float().mean())
    prior = torch.tensor(splits.train_counts, dtype=torch.float32)
    backbone_acc_la = float(((feats["pool"][1] - torch.log(prior / prior.sum())).argmax(1) == data["pool"][1])
                            .float().mean())
    train, val, pool = ((feats[s][0], data[s][1]) for s in ("train", "val", "pool"))
    counts = splits.train_counts
    base = TrainConfig(method="ce", seed=seed, **REFERENCE_HEAD)

    def head(cfg: TrainConfig):
        h = Head(splits.num_classes, train[0].shape[1])
        h.fc.load_state_dict(last_linear(backbone).state_dict())
        loop = fit_in_process(h, cfg, train, val)
        h.eval()
        with torch.no_grad():
            return h, h(val[0]), h(pool[0]), loop

    rows = []

    def record(method: str, knob: str, value: float, val_logits, pool_logits, loop=None):
        extra = {"lambda_max": float(loop.dual.lam.max()) if loop is not None and loop.dual is not None else 0.0}
        for where, logits, labels, n in (("pool", pool_logits, pool[1], N_SPLITS), ("val", val_logits, val[1],
                                                                                   N_VAL_SPLITS)):
            for r in _cp_rows(logits, labels, counts, n, seed):
                rows.append({"method": method, "knob": knob, "value": value, "where": where, **r, **extra})

    record("ce", "", 0.0, feats["val"][1], feats["pool"][1])
    ft = dict(finetune_epochs=head_finetune_epochs, finetune_lr=base.lr)
    _, v, p, _ = head(finetune_config(base, "ce_finetune", **ft))
    record("ce_finetune", "", 0.0, v, p)
    # the control with post-hoc logit adjustment (Menon et al., ICLR 2021: logits - log prior): the standard
    # long-tail correction, free, so that a method is not credited with what rebalancing alone does
    log_prior = torch.log(torch.tensor(counts, dtype=torch.float32) / sum(counts))
    record("ce_finetune_la", "", 0.0, v - log_prior, p - log_prior)
    for method, (knob, values) in KNOBS.items():
        if methods and method not in methods:
            continue
        for value in values:
            cfg = dataclasses.replace(finetune_config(base, method, **ft), **(overrides or {}), **{knob: value})
            _, v, p, loop = head(cfg)
            record(method, knob, value, v, p, loop)
            if method == "cact":  # the control's free correction on top of CaCT: does CaCT add to it?
                record("cact_la", knob, value, v - log_prior, p - log_prior, loop)
        print(f"  seed {seed} {method}: {len(values)} knob values ({time.time() - t_start:.0f}s)", flush=True)
    frame = pl.DataFrame(rows).with_columns(pl.lit(seed).alias("seed"))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    frame.write_parquet(tmp)
    facts = {"dataset": dataset, "imbalance_factor": imbalance_factor, "seed": seed, "val_fraction": val_fraction,
             "backbone": BACKBONES[dataset], "backbone_pool_accuracy": backbone_acc,
             "backbone_pool_accuracy_logit_adjusted": backbone_acc_la,
             "backbone_seconds": round(backbone_seconds, 1),
             "backbone_device": backbone_facts.get("device", f"{os.cpu_count()} CPU cores"), "feature_dim": int(train[0].shape[1]),
             "train_counts": counts, "head": {k: list(v) if isinstance(v, tuple) else v
                                               for k, v in REFERENCE_HEAD.items()},
             "head_finetune_epochs": head_finetune_epochs, "overrides": overrides or {}, "seconds": round(time.time() - t_start, 1)}
    target.with_suffix(".json").write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, target)
    print(f"{target}: backbone pool accuracy {backbone_acc:.3f} (trained in {backbone_seconds:.0f}s), "
          f"{time.time() - t_start:.0f}s", flush=True)


# ----------------------------------------------------------------------------------------------------------
# Report: fronts, the D_val-selected points, paired intervals over seeds, verdicts

def _t95(n: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1)) if n > 1 else float("nan")


def _interval(d: np.ndarray) -> tuple[float, float, float]:
    m = float(d.mean())
    if len(d) < 2:
        return m, float("nan"), float("nan")
    h = _t95(len(d)) * float(d.std(ddof=1)) / math.sqrt(len(d))
    return m, m - h, m + h


def _frame(files: list[Path]):
    """The rows of a measured folder's seed files, as one frame."""
    import polars as pl

    return pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")


def _chosen(frame, score: str):
    """Pool means per seed (``_per_seed``) of every method at its D_val-selected knob."""
    return _per_seed(frame, score).join(_selected(frame), on=["seed", "method", "value"], how="inner")


def _selected(frame):
    """Per (seed, method): the knob value with the smallest mean APS set on D_val (standard CP, alpha 0.1)."""
    import polars as pl

    val = (frame.filter((pl.col("where") == "val") & (pl.col("score") == "aps") & (pl.col("predictor") == "standard"))
           .group_by("seed", "method", "value").agg(pl.col("size").mean().alias("val_size"))
           .sort("seed", "method", "val_size", "value"))
    return val.group_by("seed", "method", maintain_order=True).first().select("seed", "method", "value")


def _per_seed(frame, score: str):
    """Pool means over the R splits per (seed, method, value, predictor)."""
    import polars as pl

    return (frame.filter((pl.col("where") == "pool") & (pl.col("score") == score))
            .group_by("seed", "method", "value", "predictor")
            .agg(*(pl.col(m).mean() for m in METRICS), pl.col("lambda_max").first()))


def _matched(per_seed, method: str, predictor: str, at: dict) -> dict:
    """Per seed: tail_size and covgap of ``method``'s front interpolated at the mean size ``at[seed]`` (NaN when
    outside the front)."""
    import polars as pl

    out = {}
    for seed, size in at.items():
        front = per_seed.filter((pl.col("seed") == seed) & (pl.col("method") == method)
                                & (pl.col("predictor") == predictor)).sort("size")
        s = front["size"].to_numpy()
        if len(s) == 0 or not (s.min() <= size <= s.max()):
            out[seed] = {"tail_size": float("nan"), "covgap": float("nan")}
            continue
        out[seed] = {m: float(np.interp(size, s, front[m].to_numpy())) for m in ("tail_size", "covgap")}
    return out


def _folders(out: Path) -> list[Path]:
    """Measured folders in reading order: by dataset, then IF as a number, then variant tag."""
    def key(p: Path):
        dataset, _, rest = p.name.partition("-if")
        number, _, tag = rest.partition("-")
        try:
            return dataset, float(number), tag
        except ValueError:
            return dataset, float("inf"), p.name
    return sorted((p for p in out.iterdir() if p.is_dir()), key=key)


def report(out: Path) -> str:
    import polars as pl

    lines = []
    for folder in _folders(out):
        files = sorted(folder.glob("seed*.parquet"))
        if not files:
            continue
        frame = _frame(files)
        facts = [json.loads(f.with_suffix(".json").read_text()) for f in files]
        seeds = sorted(frame["seed"].unique().to_list())
        acc = np.array([f["backbone_pool_accuracy"] for f in facts])
        acc_la = np.array([f["backbone_pool_accuracy_logit_adjusted"] for f in facts])
        secs = np.array([f["backbone_seconds"] for f in facts])
        where = facts[0].get("backbone_device", "2 CPU cores")
        lines += [f"### {folder.name}: {len(seeds)} seeds ({', '.join(map(str, seeds))})", "",
                  f"Backbone ({facts[0]['backbone']['family']}) accuracy on the balanced pool {acc.mean():.3f} "
                  f"(seeds {acc.min():.3f}-{acc.max():.3f}; with post-hoc logit adjustment {acc_la.mean():.3f}), "
                  f"trained in {secs.mean():.0f} s per seed on {where}; "
                  f"training counts per class {facts[0]['train_counts']}.", ""]
        sel = _selected(frame)
        for score in SCORES:
            per_seed = _per_seed(frame, score)
            chosen = per_seed.join(sel, on=["seed", "method", "value"], how="inner")
            lines += [f"**{score.upper()}, alpha = {ALPHA}, each method at its D_val-selected knob** (mean over "
                      f"seeds of the R = {N_SPLITS}-split means; paired difference against the control "
                      f"ce_finetune with the same predictor, 95% t-interval over seeds):", "",
                      "| method | predictor | knob | accuracy | coverage | size | tail size | CovGap (pts) | "
                      "Δ size | Δ tail size | Δ CovGap (pts) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
            control = {p: chosen.filter((pl.col("method") == "ce_finetune") & (pl.col("predictor") == p)).sort("seed")
                       for p in ("standard", "classwise")}
            methods = ["ce", "ce_finetune", "ce_finetune_la"] + list(KNOBS) + ["cact_la"]
            for predictor in ("standard", "classwise"):
                for method in methods:
                    rows = chosen.filter((pl.col("method") == method) & (pl.col("predictor") == predictor)).sort("seed")
                    if rows.height == 0:
                        continue
                    knob = KNOBS.get(method.removesuffix("_la"), ("", ()))[0]  # cact_la: cact's knob
                    knob_text = f"{knob} {', '.join(f'{v:g}' for v in rows['value'].to_list())}" if knob else "-"
                    cells = [f"{rows[m].mean():.3f}" for m in ("accuracy", "coverage", "size", "tail_size")]
                    cells.append(f"{rows['covgap'].mean():.2f}")
                    for m in ("size", "tail_size", "covgap"):
                        if method == "ce_finetune":
                            cells.append("control")
                            continue
                        d = rows[m].to_numpy() - control[predictor][m].to_numpy()
                        mean, lo, hi = _interval(d)
                        cells.append(f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]")
                    lines.append(f"| {method} | {predictor} | {knob_text} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += _verdicts(frame, sel, seeds)
        for predictor in ("standard", "classwise"):
            lines += per_class(frame, sel, facts[0]["train_counts"], predictor)
        lines += _fronts(frame)
    return "\n".join(lines) + "\n"


PER_CLASS_METHODS = ("ce_finetune", "ce_finetune_la", "conftr", "cact")


def _per_class_stats(frame, sel, predictor: str, score: str = "aps", methods=PER_CLASS_METHODS) -> dict:
    """method -> (set size [seeds, K], coverage [seeds, K]): per seed the mean over the R pool splits, each
    method at its D_val-selected knob; empty for measurements made before the per-class columns were kept."""
    import polars as pl

    if "class_size" not in frame.columns:
        return {}
    chosen = (frame.filter((pl.col("where") == "pool") & (pl.col("score") == score)
                           & (pl.col("predictor") == predictor) & pl.col("class_size").is_not_null())
              .join(sel, on=["seed", "method", "value"], how="inner"))
    stats = {}
    for method in methods:
        rows = chosen.filter(pl.col("method") == method).sort("seed", "split")
        seeds = rows["seed"].unique(maintain_order=True).to_list()
        if not seeds:
            return {}
        stats[method] = tuple(np.stack([np.array(rows.filter(pl.col("seed") == sd)[c].to_list()).mean(0)
                                        for sd in seeds]) for c in ("class_size", "class_coverage"))
    return stats


def per_class(frame, sel, train_counts, predictor: str, score: str = "aps",
              methods: tuple[str, ...] = PER_CLASS_METHODS) -> list[str]:
    """Set size and coverage per class against its training count, each method at its D_val-selected knob:
    the mean over seeds of each seed's R-split mean; CaCT's paired differences with a 95% t-interval over
    seeds."""
    stats = _per_class_stats(frame, sel, predictor, score, methods)
    if not stats:
        return []
    n = len(next(iter(stats.values()))[0])

    def delta(m: int, base: str, scale: float, k: int) -> str:
        mean, lo, hi = _interval(scale * (stats["cact"][m] - stats[base][m])[:, k])
        mark = "**" if lo > 0 or hi < 0 else ""
        return f"{mark}{mean:+.2f} [{lo:+.2f}, {hi:+.2f}]{mark}"

    lines = [f"**Per class, {score.upper()} with {predictor} CP, alpha = {ALPHA}** (each method at its D_val-selected "
             f"knob; mean over {n} seeds of the R = {N_SPLITS}-split means; Δ: CaCT minus the baseline, 95% "
             "t-interval over seeds, bold where it excludes zero; coverage in %):", "",
             "| class (train count) | " + " | ".join(f"size {m}" for m in methods)
             + " | Δ size vs ce_finetune | Δ size vs ce_finetune_la | "
             + " | ".join(f"coverage {m}" for m in methods) + " | Δ coverage vs ce_finetune |",
             "|---|" + "---|" * (2 * len(methods) + 3)]
    for k in np.argsort(-np.asarray(train_counts), kind="stable"):
        cells = [f"{stats[m][0][:, k].mean():.2f}" for m in methods]
        cells += [delta(0, "ce_finetune", 1.0, k), delta(0, "ce_finetune_la", 1.0, k)]
        cells += [f"{100 * stats[m][1][:, k].mean():.1f}" for m in methods]
        cells.append(delta(1, "ce_finetune", 100.0, k))
        lines.append(f"| {k} ({train_counts[k]}) | " + " | ".join(cells) + " |")
    return lines + [""]


def plot_per_class(folder: Path, png: Path) -> None:
    """Two panels for one measured (dataset, IF): APS set size per class under class-wise CP, and coverage per
    class under standard CP, against the class's training count, each method at its D_val-selected knob, mean
    over seeds with its 95% t-interval."""
    from matplotlib.figure import Figure

    files = sorted(folder.glob("seed*.parquet"))
    frame = _frame(files)
    counts = np.asarray(json.loads(files[0].with_suffix(".json").read_text())["train_counts"])
    sel = _selected(frame)
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    panels = ((fig.add_subplot(1, 2, 1), "classwise", 0, "set size (APS, class-wise CP)"),
              (fig.add_subplot(1, 2, 2), "standard", 1, "coverage (APS, standard CP)"))
    for ax, predictor, m, label in panels:
        stats = _per_class_stats(frame, sel, predictor)
        if not stats:
            raise SystemExit(f"{folder}: no per-class columns (measured before they were kept)")
        for i, (method, values) in enumerate(stats.items()):
            v = values[m]
            mean = v.mean(0)
            half = _t95(len(v)) * v.std(0, ddof=1) / math.sqrt(len(v)) if len(v) > 1 else np.zeros_like(mean)
            x = counts * 1.04 ** (i - 1.5)  # a small offset per method so the intervals do not hide each other
            ax.errorbar(x, mean, yerr=half, marker="o", ms=4, capsize=2, lw=1, label=method)
        if m == 1:
            ax.axhline(1 - ALPHA, color="grey", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("training images of the class (log)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    panels[0][0].legend(fontsize=8)
    fig.suptitle(f"{folder.name}: per class, {len(files)} seeds, mean and 95% interval over seeds "
                 f"(each seed: the mean of R = {N_SPLITS} cal/test splits)", fontsize=10)
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, png)


def _verdict(d: np.ndarray, scale: float = 1.0) -> str:
    mean, lo, hi = _interval(scale * d)
    if len(d) < 2:
        return f"one seed, no interval ({mean:+.3f})"
    word = "better" if hi < 0 else "worse" if lo > 0 else "no detectable difference"
    return f"{word} ({mean:+.3f} [{lo:+.3f}, {hi:+.3f}])"


def _verdicts(frame, sel, seeds) -> list[str]:
    """CaCT (class-wise CP, its D_val-selected knob) against each baseline on APS tail size and CovGap,
    paired over seeds; and at matched mean set size (CaCT's front interpolated at the baseline's size)."""
    import polars as pl

    per_seed = _per_seed(frame, "aps")
    chosen = per_seed.join(sel, on=["seed", "method", "value"], how="inner")

    def pick(method, predictor):
        return chosen.filter((pl.col("method") == method) & (pl.col("predictor") == predictor)).sort("seed")

    lines = ["**Verdicts (APS, alpha = 0.1; negative = CaCT smaller; 95% t-interval over the seeds of the paired "
             "difference of R-split means)**", "",
             "| CaCT (predictor) | against | Δ size | Δ tail size | Δ CovGap (pts) | at matched mean size: "
             "Δ tail size | Δ CovGap (pts) |", "|---|---|---|---|---|---|---|"]
    baselines = [("ce_finetune", "standard"), ("ce_finetune", "classwise"), ("ce_finetune_la", "standard"),
                 ("ce_finetune_la", "classwise"), ("conftr", "standard"),
                 ("conftr", "classwise"), ("conftr_class", "classwise"), ("cact_uniform", "classwise")]
    for cact_pred in ("standard", "classwise"):
        cact = pick("cact", cact_pred)
        for method, predictor in baselines:
            base = pick(method, predictor)
            if base.height != cact.height or base.height == 0:
                continue
            cells = [_verdict(cact[m].to_numpy() - base[m].to_numpy(), s)
                     for m, s in (("size", 1), ("tail_size", 1), ("covgap", 1))]
            at = dict(zip(base["seed"].to_list(), base["size"].to_list()))
            matched = _matched(per_seed, "cact", cact_pred, at)
            for m, s in (("tail_size", 1), ("covgap", 1)):
                d = np.array([matched[sd][m] for sd in at]) - base[m].to_numpy()
                ok = ~np.isnan(d)
                cells.append(_verdict(d[ok], s) + (f" ({ok.sum()} of {len(d)} seeds in range)" if not ok.all()
                                                   else "") if ok.sum() > 1 else "outside CaCT's front")
            lines.append(f"| cact ({cact_pred}) | {method} ({predictor}) | " + " | ".join(cells) + " |")
    for predictor in ("standard", "classwise"):  # both with the free correction (measured since 2026-11-30)
        pair = _la_pair(chosen, predictor)
        if pair is not None:
            lines.append(f"| cact_la ({predictor}) | ce_finetune_la ({predictor}) | " + " | ".join(_la_verdicts(*pair))
                         + " | - | - |")
    return lines + [""]


def _la_pair(chosen, predictor: str):
    """(cact_la, ce_finetune_la) rows of one predictor in seed order, or None where cact_la was not measured."""
    import polars as pl

    la, base = (chosen.filter((pl.col("method") == m) & (pl.col("predictor") == predictor)).sort("seed")
                for m in ("cact_la", "ce_finetune_la"))
    return (la, base) if la.height and la.height == base.height else None


def _la_verdicts(la, base) -> list[str]:
    return [_verdict(la[m].to_numpy() - base[m].to_numpy()) for m in ("size", "tail_size", "covgap")]


def la_summary(out: Path, score: str = "aps") -> str:
    """One row per measured folder with ``cact_la``: CaCT's heads with the control's post-hoc logit adjustment
    (each at its D_val-selected knob) against the logit-adjusted control, same predictor, paired over seeds."""
    lines = ["| folder (seeds) | predictor | cact_la: accuracy, size, tail size | ce_finetune_la: accuracy, size, "
             "tail size | Δ size | Δ tail size | Δ CovGap (pts) |", "|---|---|---|---|---|---|---|"]
    for folder in _folders(out):
        files = sorted(folder.glob("seed*.parquet"))
        frame = _frame(files) if files else None
        if frame is None or "cact_la" not in frame["method"].unique().to_list():
            continue
        chosen = _chosen(frame, score)
        for predictor in ("standard", "classwise"):
            pair = _la_pair(chosen, predictor)
            if pair is None:
                continue
            la, _ = pair
            cells = [", ".join(f"{r[m].mean():.3f}" for m in ("accuracy", "size", "tail_size")) for r in pair]
            cells += _la_verdicts(*pair)
            lines.append(f"| {folder.name} ({la.height}) | {predictor} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def verdict_summary(out: Path, score: str = "aps", predictor: str = "classwise") -> str:
    """One row per measured (dataset, IF) folder without a variant tag: CaCT at its D_val-selected knob against
    each baseline (all with the same predictor), as verdict words with the paired mean difference over seeds."""
    import polars as pl

    baselines = ("ce_finetune", "ce_finetune_la", "conftr", "conftr_class", "cact_uniform")
    lines = ["| dataset, IF (seeds) | backbone acc. (LA) | CaCT: size, tail size, CovGap | "
             + " | ".join(f"vs {b}: Δ size / Δ tail / Δ CovGap" for b in baselines) + " |",
             "|---|---|---|" + "---|" * len(baselines)]
    word = {"better": "**−**", "worse": "**+**", "no detectable difference": "0"}
    for folder in _folders(out):
        files = sorted(folder.glob("seed*.parquet"))
        facts = [json.loads(f.with_suffix(".json").read_text()) for f in files]
        # protocol folders only: not a variant (a tag: a re-run such as the -la folders, or overrides), nor
        # another D_val fraction
        if not files or _tag(folder, facts[0]) or facts[0].get("val_fraction", 0.2) != 0.2:
            continue
        frame = _frame(files)
        chosen = _chosen(frame, score)

        def pick(m):
            return chosen.filter((pl.col("method") == m) & (pl.col("predictor") == predictor)).sort("seed")

        cact = pick("cact")
        acc = np.mean([f["backbone_pool_accuracy"] for f in facts])
        acc_la = np.mean([f["backbone_pool_accuracy_logit_adjusted"] for f in facts])
        cells = [f"{folder.name} ({len(files)})", f"{acc:.3f} ({acc_la:.3f})",
                 f"{cact['size'].mean():.2f}, {cact['tail_size'].mean():.2f}, {cact['covgap'].mean():.2f}"]
        for b in baselines:
            base = pick(b)
            if base.height != cact.height or base.height == 0:
                cells.append("-")
                continue
            parts = []
            for m in ("size", "tail_size", "covgap"):
                d = cact[m].to_numpy() - base[m].to_numpy()
                mean, lo, hi = _interval(d)
                verdict = "better" if hi < 0 else "worse" if lo > 0 else "no detectable difference"
                parts.append(f"{word[verdict]} {mean:+.2f}")
            cells.append(" / ".join(parts))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def checks_table(out: Path, base: str = "newsgroups-if10", score: str = "aps", predictor: str = "classwise") -> str:
    """The seed's checks: every variant folder of ``base`` (``<base>-<tag>``: CaCT re-swept with TrainConfig
    overrides; ``<base>-vf<f>``: another D_val fraction, hence other splits and backbones) beside ``base``: CaCT at
    its D_val-selected knob, against its own folder's control and logit-adjusted control, and (same backbones:
    tag variants only) against the default CaCT of the same seeds."""
    import polars as pl

    def load(folder):
        files = sorted(folder.glob("seed*.parquet"))
        frame = _frame(files)
        facts = json.loads(files[0].with_suffix(".json").read_text())
        chosen = _chosen(frame, score)
        return chosen.filter(pl.col("predictor") == predictor), facts

    def cell(a, b, m):
        joined = a.join(b, on="seed", suffix="_b")
        if joined.height == 0:
            return "-"
        mean, lo, hi = _interval(joined[m].to_numpy() - joined[f"{m}_b"].to_numpy())
        return f"{mean:+.2f} [{lo:+.2f}, {hi:+.2f}]"

    ref, _ = load(out / base)
    ref_cact = ref.filter(pl.col("method") == "cact")
    lines = ["| variant | seeds | CaCT size, tail size | Δ tail vs its ce_finetune | Δ tail vs its ce_finetune_la | "
             "Δ size vs default CaCT | Δ tail vs default CaCT |", "|---|---|---|---|---|---|---|"]
    for folder in [out / base] + [p for p in _folders(out) if p.name.startswith(base + "-")]:
        chosen, facts = load(folder)
        if folder.name != base and not facts.get("overrides") and facts["val_fraction"] == 0.2:
            continue  # a re-run of the default under a tag (the -la folders), not a check
        cact = chosen.filter(pl.col("method") == "cact")
        what = "default" if folder.name == base else (
            ", ".join(f"{k}={v}" for k, v in facts.get("overrides", {}).items())
            or f"val_fraction={facts['val_fraction']:g}")
        same_backbones = bool(facts.get("overrides"))
        lines.append(f"| {what} | {cact.height} | {cact['size'].mean():.2f}, {cact['tail_size'].mean():.2f} | "
                     f"{cell(cact, chosen.filter(pl.col('method') == 'ce_finetune'), 'tail_size')} | "
                     f"{cell(cact, chosen.filter(pl.col('method') == 'ce_finetune_la'), 'tail_size')} | "
                     f"{cell(cact, ref_cact, 'size') if same_backbones else '-'} | "
                     f"{cell(cact, ref_cact, 'tail_size') if same_backbones else '-'} |")
    return "\n".join(lines) + "\n"


def _fronts(frame) -> list[str]:
    """Each method's front over its knob (APS, pool, means over seeds and splits)."""
    import polars as pl

    per_seed = _per_seed(frame, "aps")
    lines = ["**Fronts (APS, alpha = 0.1, pool; mean over seeds of the R-split means)**", "",
             "| method | predictor | knob value | accuracy | size | tail size | CovGap (pts) | max lambda |",
             "|---|---|---|---|---|---|---|---|"]
    agg = (per_seed.group_by("method", "value", "predictor")
           .agg(*(pl.col(m).mean() for m in METRICS), pl.col("lambda_max").mean()))
    order = {m: i for i, m in enumerate(["ce", "ce_finetune", "ce_finetune_la"] + list(KNOBS))}
    agg = agg.with_columns(pl.col("method").replace_strict(order, default=99).alias("_o")).sort("predictor", "_o",
                                                                                               "value")
    for r in agg.iter_rows(named=True):
        knob = KNOBS.get(r["method"], ("", ()))[0]
        lines.append(f"| {r['method']} | {r['predictor']} | {knob + ' ' + format(r['value'], 'g') if knob else '-'} | "
                     f"{r['accuracy']:.3f} | {r['size']:.3f} | {r['tail_size']:.3f} | {r['covgap']:.2f} | "
                     f"{r['lambda_max']:.3g} |")
    return lines + [""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train and evaluate every head of the given seeds")
    r.add_argument("--dataset", choices=sorted(BACKBONES), required=True)
    r.add_argument("--data-root", required=True, help="the dataset in its official format")
    r.add_argument("--imbalance-factor", type=float, required=True)
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    r.add_argument("--val-fraction", type=float, default=0.2)
    r.add_argument("--head-finetune-epochs", type=int, default=20)
    r.add_argument("--methods", nargs="+", choices=sorted(KNOBS), default=None,
                   help="sweep only these methods (ce, ce_finetune and the logit-adjusted control always run)")
    r.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="TrainConfig fields of every conformal head, e.g. regularization_strength=10")
    r.add_argument("--tag", default="", help="suffix of the output folder of such a variant")
    r.add_argument("--out", type=Path, required=True, help="where the measured rows go (committed)")
    r.add_argument("--work", type=Path, required=True, help="scratch folder: splits and backbones (not committed)")
    b = sub.add_parser("backbones", help="only build the splits and train (cache) the backbones of the given seeds "
                                         "in --work, e.g. on a GPU machine; `run` with the same --work reuses them")
    b.add_argument("--dataset", choices=sorted(BACKBONES), required=True)
    b.add_argument("--data-root", required=True, help="the dataset in its official format")
    b.add_argument("--imbalance-factor", type=float, required=True)
    b.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    b.add_argument("--val-fraction", type=float, default=0.2)
    b.add_argument("--work", type=Path, required=True, help="scratch folder: splits and backbones")
    b.add_argument("--device", default="cpu", help="cpu or cuda")
    b.add_argument("--epochs", type=int, default=None, help="smoke only: shorten the backbone's loop (such a "
                   "backbone is refused by `run`)")
    b.add_argument("--verbose", action="store_true", help="one line per epoch (validation accuracy, sets)")
    q = sub.add_parser("report", help="print the verdicts and fronts of every measured (dataset, IF)")
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--summary", action="store_true", help="only the one-row-per-(dataset, IF) verdict table")
    q.add_argument("--checks", action="store_true", help="only the table of the seed's checks (variants)")
    q.add_argument("--la", action="store_true", help="only CaCT with post-hoc logit adjustment against the "
                   "logit-adjusted control")
    g = sub.add_parser("plot", help="per-class set size and coverage vs training count of one measured folder")
    g.add_argument("folder", type=Path, help="a measured (dataset, IF) folder, e.g. MEASURED/cifar10-if100")
    g.add_argument("--png", type=Path, required=True)
    a = p.parse_args(argv)
    if a.cmd == "run":
        import torch

        overrides = {}
        for item in a.set:
            field, _, value = item.partition("=")
            if not value:
                p.error(f"--set {item!r}: expected FIELD=VALUE")
            overrides[field] = json.loads(value) if value[0] in "0123456789-[{tfn" else value
        if overrides and not a.tag:
            p.error("--set needs --tag (the variant's folder name)")

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
        for seed in a.seeds:
            run_seed(a.dataset, a.data_root, a.imbalance_factor, seed, a.out, a.work, a.val_fraction,
                     a.head_finetune_epochs, tuple(a.methods or ()), overrides, a.tag)
    elif a.cmd == "backbones":
        import torch

        from stages import payload

        for seed in a.seeds:
            work = a.work / _folder_name(a.dataset, a.imbalance_factor, a.val_fraction)  # run_seed's layout
            work.mkdir(parents=True, exist_ok=True)
            splits = _splits(a.dataset, a.data_root, a.imbalance_factor, a.val_fraction, seed, work)
            model, facts = _backbone(a.dataset, splits, seed, work, a.device, a.epochs, a.verbose)
            x, y = (t.to(a.device) for t in payload.read_split_tensors(splits, "pool"))
            model = model.to(a.device)
            with torch.no_grad():
                logits = torch.cat([model(x[i:i + 1000]) for i in range(0, len(y), 1000)])
            print(json.dumps({"backbone": str(work / f"backbone-s{seed}.pt"), "seconds": facts["seconds"],
                              "device": facts["device"], "pool_accuracy": round(float((logits.argmax(1) == y)
                                                                                    .float().mean()), 4)}),
                  flush=True)
    elif a.cmd == "plot":
        plot_per_class(a.folder, a.png)
        print(a.png)
    else:
        print(checks_table(a.out) if a.checks else la_summary(a.out) if a.la else
              verdict_summary(a.out) if a.summary else report(a.out), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
