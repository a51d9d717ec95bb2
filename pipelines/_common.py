"""What every pipeline shares: the common flags and the chain build splits -> (sweep) -> train -> infer ->
evaluate -> report. A dataset's pipeline script only adds its own flags and defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cact_ops import methods as method_registry  # noqa: E402
from cact_ops.losses import METHODS  # noqa: E402
from cact_ops.training import TrainConfig  # noqa: E402


@dataclass
class Defaults:
    """A dataset's defaults for the common flags (each documented in --help)."""

    dataset: str
    imbalance_factor: float = 100.0
    epochs: int = 20  # CE backbone epochs (and every method's when --from-scratch)
    finetune_epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: int = 0
    augment: str = "none"
    model: str | None = None  # None: the split manifest's model family
    image_size: int | None = None
    needs_data_root: bool = True
    loop_overrides: dict = field(default_factory=dict)  # other TrainConfig fields


def parser(description: str, d: Defaults) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-root", default=None, required=d.needs_data_root,
                   help="folder holding the dataset in its official format")
    g.add_argument("--out", default=None,
                   help="run folder (default: runs/<dataset>-lt-if<IF>-seed<seed>): new, empty, or one this project "
                        "created (marked by .cact-run.json), which is then reused")
    g.add_argument("--imbalance-factor", type=float, default=d.imbalance_factor,
                   help="IF = n_max / n_min of the exponential long-tail profile (1 = balanced)")
    g.add_argument("--val-fraction", type=float, default=0.2,
                   help="stratified fraction of the official test split used as D_val for the dual step")
    t = p.add_argument_group("training")
    t.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    t.add_argument("--epochs", type=int, default=d.epochs, help="CE backbone epochs")
    t.add_argument("--finetune-epochs", type=int, default=d.finetune_epochs,
                   help="epochs of each conformal method fine-tuned from the CE backbone")
    t.add_argument("--from-scratch", action="store_true",
                   help="train every method from scratch for --epochs instead of fine-tuning the CE backbone")
    t.add_argument("--frozen-features", action="store_true",
                   help="train the CE backbone, write its penultimate features (<out>/features), then train every "
                        "method as a head on them with DeepMind's ConfTr CIFAR-10 settings (stages.features."
                        "REFERENCE_HEAD: 50 epochs, batch 500, lr 0.01, T 1, ConfTr lambda 0.05, log transform); "
                        "--finetune-epochs and --from-scratch apply to the heads")
    t.add_argument("--batch-size", type=int, default=d.batch_size, help="global mini-batch size")
    t.add_argument("--lr", type=float, default=d.lr, help="learning rate (fine-tunes use a tenth of it)")
    t.add_argument("--model", default=d.model, help="model family (default: the manifest's hint)")
    t.add_argument("--image-size", type=int, default=d.image_size, help="resize images to this side")
    t.add_argument("--train-alpha", type=float, default=0.1, help="alpha of the training-time threshold")
    t.add_argument("--temperature", type=float, default=1.0, help="T of the soft sets")
    t.add_argument("--eta", type=float, default=None,
                   help="CaCT's absolute target soft set size per class, instead of --eta-relative (compare with "
                        "`val_soft_size` in train/cact/history.parquet)")
    t.add_argument("--eta-relative", type=float, default=None, metavar="FACTOR",
                   help=f"CaCT: eta = FACTOR x the starting model's mean soft size on the dual-step data (the CE "
                        f"backbone on D_val), measured before the first epoch (default {TrainConfig.eta_relative})")
    t.add_argument("--reduction", choices=("class", "sample"), default=TrainConfig.reduction,
                   help="CaCT's penalty: averaged per class (each class's constraint weighs the same) or per sample "
                        "(class k weighs its frequency)")
    t.add_argument("--cal-weighting", choices=("balanced", "none"), default=TrainConfig.cal_weighting,
                   help="weights of the training calibration scores: 1/n_k (the balanced population that "
                        "calibrates at test time) or none (ConfTr's batch quantile)")
    t.add_argument("--dual-every-steps", type=int, default=TrainConfig.dual_every_steps, metavar="N",
                   help="a CaCT dual step every N optimizer steps (0: once per epoch)")
    t.add_argument("--rho-step", type=int, default=TrainConfig.rho_step,
                   help="dual steps between checks of the rho schedule (0: rho fixed)")
    t.add_argument("--lambda-max", type=float, default=d.loop_overrides.get("lambda_max", TrainConfig.lambda_max),
                   help="cap of the multipliers lambda_k (CALS's 1e6 by default)")
    t.add_argument("--regularization-strength", type=float, default=TrainConfig.regularization_strength,
                   help="torchsort soft-sort strength of the smooth quantile")
    t.add_argument("--conftr-lambda", type=float, default=d.loop_overrides.get("conftr_lambda", 1.0),
                   help="ConfTr's global size-penalty weight")
    t.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE", dest="loop_set",
                   help="any other field of cact_ops.training.TrainConfig for every method, e.g. --set rho_init=10 "
                        "quantile_operator=kl milestones=[60,80] (values: JSON, else a plain string)")
    t.add_argument("--seed", type=int, default=0, help="seed of splits, initialisation and data order")
    r = p.add_argument_group("ray")
    r.add_argument("--num-workers", type=int, default=1, help="Ray Train workers per method")
    r.add_argument("--use-gpu", action="store_true", help="one GPU per training worker and per inference actor")
    r.add_argument("--storage-path", default=None,
                   help="Ray Train storage for checkpoints (shared storage such as s3://... on a cluster)")
    r.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    r.add_argument("--autoscale", action="store_true",
                   help="the cluster adds nodes on demand: wait for workers instead of refusing when it is short")
    r.add_argument("--sweep", type=int, default=0, metavar="N",
                   help="run N Ray Tune trials per method on the validation split first and train with the best")
    r.add_argument("--no-resume", dest="resume", action="store_false",
                   help="retrain every method even when a finished run exists (default: reuse finished stages "
                        "and continue interrupted training from its last checkpoint)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--alpha", type=float, nargs="+", default=[0.1, 0.05], help="miscoverage levels evaluated")
    e.add_argument("--n-splits", type=int, default=20, help="random calibration/test splits of the pool")
    return p


def _methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise SystemExit(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    return methods


def _eta(args: argparse.Namespace) -> tuple[float, float | None]:
    """(eta, eta_relative) from the flags: --eta alone sets an absolute target, otherwise the relative one."""
    if args.eta is not None and args.eta_relative is not None:
        raise SystemExit("--eta and --eta-relative: give one of them (an absolute or a relative size target)")
    if args.eta is not None:
        if not args.eta > 0:
            raise SystemExit(f"--eta must be > 0, got {args.eta}")
        return args.eta, None
    return TrainConfig.eta, args.eta_relative if args.eta_relative is not None else TrainConfig.eta_relative


# TrainConfig fields that have a flag of their own: --set refuses them (one way to set each).
_FIELD_FLAGS = {"method": "--methods", "epochs": "--epochs / --finetune-epochs", "batch_size": "--batch-size",
                "lr": "--lr", "alpha": "--train-alpha", "temperature": "--temperature", "eta": "--eta",
                "eta_relative": "--eta-relative", "reduction": "--reduction", "cal_weighting": "--cal-weighting",
                "dual_every_steps": "--dual-every-steps", "rho_step": "--rho-step", "lambda_max": "--lambda-max",
                "regularization_strength": "--regularization-strength", "conftr_lambda": "--conftr-lambda",
                "seed": "--seed"}


def loop_settings(items: list[str]) -> dict:
    """``--set FIELD=VALUE`` items as TrainConfig fields, each checked against the field's default's type.

    >>> loop_settings(["rho_init=10", "quantile_operator=kl", "milestones=[60, 80]"])
    {'rho_init': 10.0, 'quantile_operator': 'kl', 'milestones': (60, 80)}
    """
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    out, problems = {}, []
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            problems.append(f"--set {item!r}: expected FIELD=VALUE")
            continue
        if name in _FIELD_FLAGS:
            problems.append(f"--set {name}: use {_FIELD_FLAGS[name]}")
            continue
        if name not in defaults:
            settable = sorted(set(defaults) - set(_FIELD_FLAGS))
            problems.append(f"--set {name}: not a TrainConfig field; settable: {', '.join(settable)}")
            continue
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        default = defaults[name]
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        if default is not None and value is not None and type(value) is not type(default):
            problems.append(f"--set {name}={text}: expected a {type(default).__name__} (default {default!r})")
            continue
        out[name] = value
    if problems:
        raise SystemExit("invalid flags (nothing was started):\n  " + "\n  ".join(problems))
    return out


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# (flag, attribute, accepted values in words, test): every numeric flag, checked before anything starts.
_FLAG_CHECKS = (
    ("--imbalance-factor", "imbalance_factor", "a finite number >= 1 (1 = balanced)", lambda v: _real(v) and v >= 1),
    ("--val-fraction", "val_fraction", "a number in the open interval (0, 1)", lambda v: _real(v) and 0 < v < 1),
    ("--epochs", "epochs", "an integer >= 1", lambda v: v >= 1),
    ("--finetune-epochs", "finetune_epochs", "an integer >= 1", lambda v: v >= 1),
    ("--batch-size", "batch_size", "an integer >= 2", lambda v: v >= 2),
    ("--lr", "lr", "a finite number > 0", lambda v: _real(v) and v > 0),
    ("--image-size", "image_size", "an integer >= 1 (or unset: the stored size)", lambda v: v is None or v >= 1),
    ("--train-alpha", "train_alpha", "a number in the open interval (0, 1)", lambda v: _real(v) and 0 < v < 1),
    ("--temperature", "temperature", "a finite number > 0", lambda v: _real(v) and v > 0),
    ("--eta", "eta", "a finite number > 0 (or unset)", lambda v: v is None or (_real(v) and v > 0)),
    ("--eta-relative", "eta_relative", "a finite number > 0 (or unset)", lambda v: v is None or (_real(v) and v > 0)),
    ("--dual-every-steps", "dual_every_steps", "an integer >= 0 (0: once per epoch)", lambda v: v >= 0),
    ("--rho-step", "rho_step", "an integer >= 0 (0: rho fixed)", lambda v: v >= 0),
    ("--lambda-max", "lambda_max", "a finite number > 0", lambda v: _real(v) and v > 0),
    ("--regularization-strength", "regularization_strength", "a finite number > 0", lambda v: _real(v) and v > 0),
    ("--conftr-lambda", "conftr_lambda", "a finite number >= 0", lambda v: _real(v) and v >= 0),
    ("--seed", "seed", "an integer >= 0", lambda v: v >= 0),
    ("--num-workers", "num_workers", "an integer >= 1", lambda v: v >= 1),
    ("--sweep", "sweep", "an integer >= 0 (0: no sweep)", lambda v: v >= 0),
    ("--n-splits", "n_splits", "an integer >= 1", lambda v: v >= 1),
)


def check_flags(args: argparse.Namespace) -> None:
    """Refuse every out-of-range flag at once, each named with the values it accepts: run before Ray starts and
    before anything is written, so that a typo never costs a training run."""
    problems = [f"{flag} must be {accepted}, got {getattr(args, attr)!r}"
                for flag, attr, accepted, ok in _FLAG_CHECKS if hasattr(args, attr) and not ok(getattr(args, attr))]
    alphas = list(args.alpha or [])
    if not alphas or any(not (_real(a) and 0 < a < 1) for a in alphas) or len(set(alphas)) != len(alphas):
        problems.append(f"--alpha must be one or more distinct numbers in the open interval (0, 1), got {alphas}")
    if args.model is not None:
        from cact_ops.models import MODEL_FAMILIES

        if args.model not in MODEL_FAMILIES:
            problems.append(f"--model must be one of {', '.join(sorted(MODEL_FAMILIES))}, got {args.model!r}")
    if getattr(args, "frozen_features", False) and args.sweep:
        problems.append("--frozen-features with --sweep: not supported yet (sweep the heads with "
                        "benchmarks/results/evidence.py, or drop one of the two flags)")
    if problems:
        raise SystemExit("invalid flags (nothing was started):\n  " + "\n  ".join(problems))


def _configs(args: argparse.Namespace, d: Defaults, source: dict, out: Path, methods: list[str]):
    """The split, training and evaluation configs, built and checked up front (their own checks included)."""
    from stages import evaluate, longtail

    eta, eta_relative = _eta(args)
    try:
        split_cfg = longtail.LongTailConfig(out=str(out / "splits"), imbalance_factor=args.imbalance_factor,
                                            val_fraction=args.val_fraction, seed=args.seed, **source)
        split_cfg.validate()
    except (TypeError, ValueError) as e:
        raise SystemExit(f"invalid split settings (--imbalance-factor, --val-fraction, --seed, data flags): {e}")
    known = {f.name for f in fields(TrainConfig)}
    try:
        loop = TrainConfig(
            method="ce", epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=d.optimizer,
            weight_decay=d.weight_decay, schedule=d.schedule, warmup_epochs=d.warmup_epochs, augment=d.augment,
            alpha=args.train_alpha, temperature=args.temperature, eta=eta, eta_relative=eta_relative,
            reduction=args.reduction, cal_weighting=args.cal_weighting, dual_every_steps=args.dual_every_steps,
            rho_step=args.rho_step, lambda_max=args.lambda_max, regularization_strength=args.regularization_strength,
            conftr_lambda=args.conftr_lambda, seed=args.seed,
            **{**{k: v for k, v in d.loop_overrides.items() if k in known and k not in ("lambda_max", "conftr_lambda")},
               **loop_settings(getattr(args, "loop_set", []))})
        dataclasses.replace(loop, epochs=args.finetune_epochs)  # the fine-tunes' TrainConfig checks too
    except (TypeError, ValueError) as e:
        raise SystemExit(f"invalid training settings (--epochs, --finetune-epochs, --batch-size, --train-alpha, "
                         f"...): {e}")
    ev = evaluate.EvalConfig(run_dir=out, methods=tuple(methods), alphas=tuple(args.alpha), n_splits=args.n_splits,
                             seed=args.seed)
    try:
        ev.validate()
    except ValueError as e:
        raise SystemExit(f"invalid evaluation settings (--alpha, --n-splits, --seed): {e}")
    return split_cfg, loop, ev


def _penalty_never_acted(result) -> bool:
    """Whether a conformal method's penalty (train_penalty in metrics.parquet) was 0 in every epoch."""
    import polars as pl

    metrics = pl.read_parquet(result.metrics_path)
    return "train_penalty" in metrics.columns and metrics.height > 0 and bool((metrics["train_penalty"] == 0).all())


class _Clock:
    def __init__(self):
        self.t0 = time.time()
        self.last = self.t0

    def stage(self, name: str) -> None:
        now = time.time()
        print(f"== {name} (stage {now - self.last:.1f}s, total {now - self.t0:.1f}s)", flush=True)
        self.last = now


def run(args: argparse.Namespace, d: Defaults, source: dict) -> dict:
    """Chain the stages for one dataset. ``source`` holds the LongTailConfig fields of the dataset."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # seconds saved on every short fit
    import ray

    from stages import _io, evaluate, infer, longtail, sweep, train

    # Everything that can be refused is refused here, before Ray starts and before anything is written.
    methods = _methods(args.methods)
    check_flags(args)
    out = Path(args.out or f"runs/{d.dataset}-lt-if{args.imbalance_factor:g}-seed{args.seed}")
    split_cfg, loop, eval_cfg = _configs(args, d, source, out, methods)
    try:
        _io.claim_run_folder(out)  # never write into a folder this project did not create
    except FileExistsError as e:
        raise SystemExit(f"--out: {e}")
    clock = _Clock()
    if not ray.is_initialized():
        ray.init(address=args.address, log_to_driver=True)
    clock.stage("ray ready")

    splits = longtail.build(split_cfg)
    counts = splits.manifest["counts"]
    print(f"splits: train {sum(counts['train'])} (per class {counts['train']}), val {sum(counts['val'])}, "
          f"pool {sum(counts['pool'])} -> {splits.root}")
    clock.stage("long-tailed splits")

    stage_kwargs = dict(num_workers=args.num_workers, use_gpu=args.use_gpu, storage_path=args.storage_path,
                        model_family=args.model, image_size=args.image_size, overwrite=not args.resume,
                        check_resources=not args.autoscale)
    config = {"pipeline": d.dataset, "argv": sys.argv[1:], "args": vars(args), "loop": loop.to_dict(),
              "stage": {k: v for k, v in stage_kwargs.items()}, "splits": str(splits.root)}

    overrides: dict[str, dict] = {}
    backbone = None  # the CE model the sweeps fine-tuned from: trained once, not again below
    if args.sweep:
        overrides, backbone = sweep.run_methods(splits, str(out), methods, loop, args.sweep, args.finetune_epochs,
                                                args.from_scratch, args.seed, **stage_kwargs)
        clock.stage(f"sweeps ({args.sweep} trials per method)")
    config["sweep_best"] = overrides
    _io.write_json(json.loads(json.dumps(config, default=str)), out / "config.json")

    eval_splits = None
    if args.frozen_features:
        splits, loop, stage_kwargs = _frozen_features(splits, out, loop, stage_kwargs, args.use_gpu)
        eval_splits = splits.root
        clock.stage("backbone and frozen features")
    results = train.fit_methods(splits, str(out), methods, loop=loop, finetune_epochs=args.finetune_epochs,
                                from_scratch=args.from_scratch, overrides=overrides, backbone=backbone,
                                **stage_kwargs)
    for m, r in results.items():
        fm = r.final_metrics
        note = "reused" if r.reused else (f"resumed from epoch {r.resumed_from_epoch}" if r.resumed_from_epoch else "")
        print(f"trained {m:13s} val acc {fm.get('val_accuracy', float('nan')):.3f} "
              f"val size {fm.get('val_size', float('nan')):.2f} {note}")
        if method_registry.get(m).uses_dual and fm.get("lambda_max", 0.0) < 1e-3:
            # Say it when it happens: otherwise identical rows in the table look like a bug.
            print(f"  note: every lambda of {m} stayed below 1e-3: the backbone already meets each class's size "
                  f"constraint (soft size <= eta={fm.get('eta', loop.eta):.3g}) on D_val, so {m} reduces to CE "
                  f"fine-tuning here (a smaller --eta-relative sets eta further below the backbone's soft size)")
        elif method_registry.get(m).loss != "ce" and _penalty_never_acted(r):
            print(f"  note: the conformal term of {m} was zero in every epoch (train_penalty = 0: the soft sets "
                  f"on the training batches were already below kappa={loop.kappa:g}), so {m} trained as CE "
                  f"fine-tuning here")
    clock.stage("training")

    infer.run(infer.InferConfig(run_dir=out, methods=tuple(results), use_gpu=args.use_gpu, splits_root=eval_splits))
    clock.stage("inference")
    ev = evaluate.run(dataclasses.replace(eval_cfg, methods=tuple(results), splits_root=eval_splits))
    clock.stage("evaluation and report")
    print_summary(ev.summary)
    print(f"\nreport: {ev.report_path}\nsummary: {ev.summary_path}")
    return {"out": out, "splits": splits, "train": results, "eval": ev}


def _frozen_features(splits, out: Path, loop: TrainConfig, stage_kwargs: dict, use_gpu: bool):
    """The CE backbone (<out>/backbone), its penultimate features (<out>/features), and the head protocol: the
    split handle, TrainConfig and stage arguments every method then trains with."""
    from stages import features, train

    backbone = train.fit_methods(splits, str(out / "backbone"), ["ce"], loop=loop, **stage_kwargs)["ce"]
    print(f"backbone: val acc {backbone.final_metrics.get('val_accuracy', float('nan')):.3f} "
          f"({'reused' if backbone.reused else 'trained'}) -> {backbone.model_path}")
    feats = features.extract(features.FeatureConfig(splits_root=splits.root, out=out / "features",
                                                    model=backbone.model_path, use_gpu=use_gpu))
    print(f"features: {feats.payload['dim']} per row -> {feats.root}")
    head_loop = dataclasses.replace(loop, **features.REFERENCE_HEAD)
    return feats, head_loop, {**stage_kwargs, "model_family": "head", "image_size": None}


def print_summary(summary) -> None:
    """One table per alpha: every method side by side for each score and predictor (means over the splits)."""
    import polars as pl

    cols = ["score", "predictor", "method", "accuracy", "coverage_mean", "size_mean", "covgap_mean",
            "few_size_mean"]
    with pl.Config(tbl_rows=500, tbl_cols=20, float_precision=3, tbl_hide_dataframe_shape=True,
                   tbl_hide_column_data_types=True, tbl_width_chars=160):
        for alpha in summary["alpha"].unique(maintain_order=True):
            block = (summary.filter(pl.col("alpha") == alpha)
                     .with_columns(pl.col("method").map_elements(lambda m: method_registry.order_key(m)[0],
                                                             return_dtype=pl.Int64).alias("_o"))
                     .sort("score", "predictor", "_o").select(cols))
            print(f"\nalpha = {alpha} (target coverage {1 - alpha:.2f}); CovGap in points, sizes in classes")
            print(block)
