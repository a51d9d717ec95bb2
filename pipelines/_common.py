"""What every pipeline shares: the common flags and the chain build splits -> (sweep) -> train -> infer ->
evaluate -> report. A dataset's pipeline script only adds its own flags and defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import inspect
import os
import re
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cact_ops import methods as method_registry  # noqa: E402
from cact_ops import plugins  # noqa: E402
from cact_ops._checks import is_real  # noqa: E402
from cact_ops.engine import DEFAULT_SCORES  # noqa: E402
from cact_ops.training import TrainConfig  # noqa: E402


@dataclass(frozen=True)
class Preset:
    """A dataset's pipeline settings: only what differs from the common flags' and TrainConfig's defaults."""

    dataset: str
    imbalance_factor: float = 100.0
    epochs: int = 20  # CE backbone epochs (and every method's when --from-scratch)
    finetune_epochs: int = 10
    model: str | None = None  # None: the split manifest's model family
    image_size: int | None = None
    needs_data_root: bool = True
    data_root: str = ""  # what --data-root must hold (its --help)
    loop: dict = field(default_factory=dict)  # TrainConfig fields that differ from its defaults
    # Ray Train workers per method; 0 is local mode (the training in the driver's process: no Ray Train controller
    # or worker actors to start, most of a tiny run's time on a small machine)
    num_workers: int = 1


# TrainConfig fields set by a pipeline flag of another meaning; every other field gets a flag of its own name.
_PIPELINE_SET = {"method": "--methods", "epochs": "--epochs / --finetune-epochs", "seed": "--seed"}
_RENAMED = {"alpha": "--train-alpha"}  # --alpha is the evaluation's miscoverage levels


def loop_flag(name: str) -> str:
    """The pipeline flag of a TrainConfig field.

    >>> loop_flag("rho_init"), loop_flag("alpha")
    ('--rho-init', '--train-alpha')
    """
    return _PIPELINE_SET.get(name) or _RENAMED.get(name) or "--" + name.replace("_", "-")


def _dest(name: str) -> str:
    return loop_flag(name)[2:].replace("-", "_")


def _loop_fields() -> list:
    return [f for f in fields(TrainConfig) if f.name not in _PIPELINE_SET]


def field_docs(cls) -> dict[str, str]:
    """Each dataclass field's comment, beside it or in the block right above it: the field's --help text."""
    names, docs, block = {f.name for f in fields(cls)}, {}, []
    for line in inspect.getsource(cls).splitlines():
        text = line.strip()
        if text.startswith("#"):
            block.append(text.lstrip("#").strip())
            continue
        m = re.match(r"(\w+)\s*:", text)
        if m and m.group(1) in names:
            docs[m.group(1)] = text.split("  # ", 1)[1].strip() if "  # " in text else " ".join(block)
        block = []
    return docs


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only where it says something (not None, not a switch's False / True)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add_loop_flags(group, preset: Preset) -> None:
    """One flag per TrainConfig field (--rho-init, --quantile-operator, ...), its help the field's comment. Its
    default is None (unset: the preset's value, else TrainConfig's), so an explicit value can be told apart."""
    docs = field_docs(TrainConfig)
    for f in _loop_fields():
        default = preset.loop.get(f.name, f.default)
        shown = "none" if default == () else default
        kw = {"default": None, "dest": _dest(f.name),
              "help": f"{docs.get(f.name) or 'TrainConfig.' + f.name} (default: {shown})"}
        if isinstance(f.default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(f.default, tuple):
            kw.update(nargs="*", type=int, metavar="EPOCH")
        else:
            kw["type"] = type(f.default) if f.default is not None else float
            kw["choices"] = TrainConfig.CHOICES.get(f.name)
        group.add_argument(loop_flag(f.name), **kw)


def parser(description: str, d: Preset) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=_Help)
    g = p.add_argument_group("data")
    g.add_argument("--data-root", default=None, required=d.needs_data_root,
                   help=d.data_root or "the dataset in its official format")
    g.add_argument("--out", default=None,
                   help="run folder (default: runs/<dataset>-lt-if<IF>-seed<seed>): new, empty, or one this project "
                        "created (marked by .cact-run.json), which is then reused")
    g.add_argument("--imbalance-factor", type=float, default=d.imbalance_factor,
                   help="IF = n_max / n_min of the exponential long-tail profile (1 = balanced)")
    g.add_argument("--val-fraction", type=float, default=0.2,
                   help="stratified fraction of the official test split used as D_val for the dual step")
    x = p.add_argument_group("extensions")
    x.add_argument("--plugins", nargs="+", default=None, metavar="MODULE", action=plugins.LoadPlugins,
                   help="modules that register scores, metrics or methods when imported (cact_ops.plugins; "
                        "docs/DESIGN.md section 3), loaded first: --methods and --scores then accept them")
    t = p.add_argument_group("training")
    t.add_argument("--methods", default=",".join(method_registry.names()),
                   help=f"comma-separated subset of the registered methods ({','.join(method_registry.names())}, "
                        "and those of --plugins)")
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
    t.add_argument("--model", default=d.model, help="model family (default: the manifest's hint)")
    t.add_argument("--image-size", type=int, default=d.image_size, help="resize images to this side")
    t.add_argument("--seed", type=int, default=0, help="seed of splits, initialisation and data order")
    _add_loop_flags(p.add_argument_group("every method's TrainConfig (cact_ops.training.TrainConfig)"), d)
    r = p.add_argument_group("ray")
    r.add_argument("--num-workers", type=int, default=d.num_workers,
                   help="Ray Train workers per method; 0: local mode, the training runs in this process (a sweep's: "
                        "in its Tune trial's) with no worker group to start; checkpoints and resume on rerun, but no "
                        "worker restarts")
    r.add_argument("--use-gpu", action="store_true", help="one GPU per training worker and per inference actor")
    r.add_argument("--infer-actors", type=int, default=None, metavar="N",
                   help="model actors of the inference pass (default: one per GPU of the cluster with --use-gpu, "
                        "else 1; fewer when fewer CPUs are free)")
    r.add_argument("--storage-path", default=None,
                   help="Ray Train storage for checkpoints (shared storage such as s3://... on a cluster)")
    r.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    r.add_argument("--autoscale", action="store_true",
                   help="the cluster adds nodes on demand: wait for workers instead of refusing when it is short")
    r.add_argument("--sweep", type=int, default=0, metavar="N",
                   help="run N Ray Tune trials per method on the validation split first and train with the best")
    r.add_argument("--verbose", action="store_true",
                   help="show Ray's own log lines and progress bars (by default only warnings and errors, beside the "
                        "project's progress lines)")
    r.add_argument("--no-resume", dest="resume", action="store_false",
                   help="retrain every method even when a finished run exists (by default finished stages are "
                        "reused and interrupted training continues from its last checkpoint)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--alpha", type=float, nargs="+", default=[0.1, 0.05], help="miscoverage levels evaluated")
    e.add_argument("--n-splits", type=int, default=20, help="random calibration/test splits of the pool")
    e.add_argument("--scores", default=",".join(DEFAULT_SCORES),
                   help="comma-separated registered non-conformity scores evaluated (cact_ops.scores; and those of "
                        "--plugins)")
    k = p.add_argument_group("tracking (MLflow: pip install -e '.[tracking]')")
    k.add_argument("--mlflow-uri", default=None, metavar="URI",
                   help="log the finished run to MLflow from the driver (a file store file:/abs/path/mlruns, a "
                        "server http://host:5000, or with the full mlflow package a database sqlite:///mlflow.db): "
                        "one run per pipeline run with a nested run per method (configs, "
                        "per-epoch metrics, summary table, report and plots), and one run per Tune trial with "
                        "--sweep; a rerun updates, never duplicates (stages/tracking.py)")
    k.add_argument("--mlflow-experiment", default=f"cact-{d.dataset}", metavar="NAME",
                   help="MLflow experiment of the run (the sweep trials go to NAME-sweeps)")
    return p


def _names(text: str) -> list[str]:
    """A comma-separated flag's names (--methods, --scores)."""
    return [m.strip() for m in text.split(",") if m.strip()]


def _methods(text: str) -> list[str]:
    methods = _names(text)
    known = method_registry.names()
    bad = [m for m in methods if m not in known]
    if bad or not methods:
        raise SystemExit(f"--methods: unknown {bad}; choose from {', '.join(known)}")
    return methods


def loop_values(args: argparse.Namespace, d: Preset) -> dict:
    """The TrainConfig fields the preset and the flags set (flags win). ``--eta`` alone sets an absolute target
    (eta_relative None); otherwise CaCT's target is relative."""
    given = {f.name: getattr(args, _dest(f.name)) for f in _loop_fields()
             if getattr(args, _dest(f.name), None) is not None}
    if "eta" in given and "eta_relative" in given:
        raise SystemExit("--eta and --eta-relative: give one of them (an absolute or a relative size target)")
    if "eta" in given:
        given["eta_relative"] = None
    if "milestones" in given:
        given["milestones"] = tuple(given["milestones"])
    return {**d.loop, **given}


# (flag, attribute, accepted values in words, test): the pipeline's own numeric flags (TrainConfig's fields are
# checked by TrainConfig.RANGES), all checked before anything starts.
_FLAG_CHECKS = (
    ("--imbalance-factor", "imbalance_factor", "a finite number >= 1 (1 = balanced)", lambda v: is_real(v) and v >= 1),
    ("--val-fraction", "val_fraction", "a number in the open interval (0, 1)", lambda v: is_real(v) and 0 < v < 1),
    ("--epochs", "epochs", *TrainConfig.RANGES["epochs"]),
    ("--finetune-epochs", "finetune_epochs", *TrainConfig.RANGES["epochs"]),
    ("--image-size", "image_size", "an integer >= 1 (or unset: the stored size)", lambda v: v is None or v >= 1),
    ("--seed", "seed", *TrainConfig.RANGES["seed"]),
    ("--num-workers", "num_workers", "an integer >= 0 (0: local mode, this process trains)", lambda v: v >= 0),
    ("--sweep", "sweep", "an integer >= 0 (0: no sweep)", lambda v: v >= 0),
    ("--infer-actors", "infer_actors", "an integer >= 1 (or unset)", lambda v: v is None or v >= 1),
    ("--n-splits", "n_splits", "an integer >= 1", lambda v: v >= 1),
)


def check_flags(args: argparse.Namespace) -> None:
    """Refuse every out-of-range flag at once, each named with the values it accepts: run before Ray starts and
    before anything is written, so that a typo never costs a training run."""
    problems = [f"{flag} must be {accepted}, got {getattr(args, attr)!r}"
                for flag, attr, accepted, ok in _FLAG_CHECKS if hasattr(args, attr) and not ok(getattr(args, attr))]
    for f in _loop_fields():
        value = getattr(args, _dest(f.name), None)
        if value is not None and f.name in TrainConfig.RANGES and not TrainConfig.RANGES[f.name][1](value):
            problems.append(f"{loop_flag(f.name)} must be {TrainConfig.RANGES[f.name][0]}, got {value!r}")
    alphas = list(args.alpha or [])
    if not alphas or any(not (is_real(a) and 0 < a < 1) for a in alphas) or len(set(alphas)) != len(alphas):
        problems.append(f"--alpha must be one or more distinct numbers in the open interval (0, 1), got {alphas}")
    if args.model is not None:
        from cact_ops.models import MODEL_FAMILIES

        if args.model not in MODEL_FAMILIES:
            problems.append(f"--model must be one of {', '.join(sorted(MODEL_FAMILIES))}, got {args.model!r}")
    from stages import _io

    for flag, attr in (("--data-root", "data_root"), ("--train-list", "train_list"),
                       ("--val-list", "val_list"), ("--test-list", "test_list")):  # --out may be a URI
        try:
            _io.refuse_uri(getattr(args, attr, None), flag)
        except ValueError as e:
            problems.append(str(e))
    if getattr(args, "frozen_features", False) and args.sweep:
        problems.append("--frozen-features with --sweep: not supported yet (sweep the heads with "
                        "benchmarks/results/evidence.py, or drop one of the two flags)")
    if getattr(args, "mlflow_uri", None) is not None and args.out and _io.is_uri(args.out):
        problems.append("--mlflow-uri with a URI --out: not supported yet (MLflow logs local files); log a local "
                        "copy of the run folder with python -m stages.tracking")
    if getattr(args, "mlflow_uri", None) is not None:
        from stages.tracking import missing_mlflow

        if not args.mlflow_uri.strip():
            problems.append("--mlflow-uri must be a tracking URI (file:/abs/path/mlruns, http://host:5000, "
                            "sqlite:///mlflow.db), got ''")
        elif missing := missing_mlflow():
            problems.append(f"--mlflow-uri needs MLflow: {missing}")
        if not (getattr(args, "mlflow_experiment", None) or "").strip():
            problems.append("--mlflow-experiment must be a non-empty experiment name")
    if problems:
        raise SystemExit("invalid flags (nothing was started):\n  " + "\n  ".join(problems))


def _configs(args: argparse.Namespace, d: Preset, source: dict, out: Path, methods: list[str]):
    """The split, training and evaluation configs, built and checked up front (their own checks included)."""
    from stages import _io, evaluate, longtail

    try:
        split_cfg = longtail.LongTailConfig(out=str(_io.RunFolder(out).splits), imbalance_factor=args.imbalance_factor,
                                            val_fraction=args.val_fraction, seed=args.seed, **source)
        split_cfg.validate()
    except (TypeError, ValueError) as e:
        raise SystemExit(f"invalid split settings (--imbalance-factor, --val-fraction, --seed, data flags): {e}")
    try:
        loop = TrainConfig(method=method_registry.backbone(), epochs=args.epochs, seed=args.seed, **loop_values(args, d))
        dataclasses.replace(loop, epochs=args.finetune_epochs)  # the fine-tunes' TrainConfig checks too
    except (TypeError, ValueError) as e:
        raise SystemExit(f"invalid training settings: {e}")
    ev = evaluate.EvalConfig(run_dir=out, methods=tuple(methods), alphas=tuple(args.alpha), n_splits=args.n_splits,
                             seed=args.seed, scores=tuple(_names(args.scores)))
    try:
        ev.validate()
    except ValueError as e:
        raise SystemExit(f"invalid evaluation settings (--alpha, --n-splits, --scores, --seed): {e}")
    return split_cfg, loop, ev


def _penalty_never_acted(result) -> bool:
    """Whether a conformal method's penalty (train_penalty in metrics.parquet) was 0 in every epoch."""
    from stages import _io

    metrics = _io.read_frame(result.metrics_path)
    return "train_penalty" in metrics.columns and metrics.height > 0 and bool((metrics["train_penalty"] == 0).all())


class _Clock:
    def __init__(self):
        self.t0 = time.time()
        self.last = self.t0

    def stage(self, name: str) -> None:
        now = time.time()
        print(f"== {name} (stage {now - self.last:.1f}s, total {now - self.t0:.1f}s)", flush=True)
        self.last = now


def run(args: argparse.Namespace, d: Preset, source: dict) -> dict:
    """Chain the stages for one dataset. ``source`` holds the LongTailConfig fields of the dataset."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # seconds saved on every short fit
    import ray
    import ray.data

    from stages import _io, evaluate, infer, longtail, sweep, train
    from stages.storage import as_path

    # Everything that can be refused is refused here, before Ray starts and before anything is written.
    methods = _methods(args.methods)
    check_flags(args)
    out = as_path(args.out or f"runs/{d.dataset}-lt-if{args.imbalance_factor:g}-seed{args.seed}", absolute=False)
    split_cfg, loop, eval_cfg = _configs(args, d, source, out, methods)
    try:
        _io.claim_run_folder(out)  # never write into a folder this project did not create
    except FileExistsError as e:
        raise SystemExit(f"--out: {e}")
    clock = _Clock()
    if args.plugins:
        print(plugins.describe(args.plugins), flush=True)
        for module in args.plugins:  # its functions travel by value: workers need not import the module
            ray.cloudpickle.register_pickle_by_value(sys.modules[module])
    if not args.verbose:  # Ray Data's INFO lines in the workers of a local cluster (they inherit this environment)
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    if not ray.is_initialized():
        # Ray's own INFO lines (and Ray Data's per-epoch progress bars) drown the project's: WARNING and up only,
        # in the driver and every worker of the job, unless --verbose.
        quiet = None if args.verbose else ray.LoggingConfig(log_level="WARNING")
        ray.init(address=args.address, log_to_driver=True, logging_config=quiet)
    if not args.verbose:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
    clock.stage("ray ready")

    splits = longtail.build(split_cfg)
    counts = splits.manifest["counts"]
    print(f"splits: train {sum(counts['train'])} (per class {counts['train']}), val {sum(counts['val'])}, "
          f"pool {sum(counts['pool'])} -> {splits.root}")
    clock.stage("long-tailed splits")

    stage_kwargs = dict(num_workers=args.num_workers, use_gpu=args.use_gpu, storage_path=args.storage_path,
                        model_family=args.model, image_size=args.image_size, overwrite=not args.resume,
                        check_resources=not args.autoscale)
    config = {"pipeline": d.dataset, "argv": sys.argv[1:], "loop": loop.to_dict(),
              "args": {k: v for k, v in vars(args).items() if v is not None},  # unset flags: see "loop"
              "stage": {k: v for k, v in stage_kwargs.items()}, "splits": str(splits.root)}

    overrides: dict[str, dict] = {}
    backbone = None  # the CE model the sweeps fine-tuned from: trained once, not again below
    if args.sweep:
        tracking = {"mlflow_uri": args.mlflow_uri, "mlflow_experiment": f"{args.mlflow_experiment}-sweeps"} \
            if getattr(args, "mlflow_uri", None) else {}
        overrides, backbone = sweep.run_methods(splits, str(out), methods, loop, args.sweep, args.finetune_epochs,
                                                args.from_scratch, args.seed, **tracking, **stage_kwargs)
        clock.stage(f"sweeps ({args.sweep} trials per method)")
    config["sweep_best"] = overrides
    _io.write_json(json.loads(json.dumps(config, default=str)), _io.RunFolder(out).config)

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

    actors = args.infer_actors or \
        (max(1, int(ray.cluster_resources().get("GPU", 0))) if args.use_gpu else 1)
    infer.run(infer.InferConfig(run_dir=out, methods=tuple(results), use_gpu=args.use_gpu, splits_root=eval_splits,
                                concurrency=actors))
    clock.stage("inference")
    ev = evaluate.run(dataclasses.replace(eval_cfg, methods=tuple(results), splits_root=eval_splits))
    clock.stage("evaluation and report")
    print_summary(ev.summary)
    print(f"\nreport: {ev.report_path}\nsummary: {ev.summary_path}")
    logged = _log_to_mlflow(args, out)
    return {"out": out, "splits": splits, "train": results, "eval": ev, "mlflow": logged}


def _log_to_mlflow(args: argparse.Namespace, out: Path):
    """With --mlflow-uri: the finished run folder -> MLflow, from the driver (stages.tracking.log_run). A
    failure here does not fail the finished run: it says so, and how to log the folder later."""
    if not getattr(args, "mlflow_uri", None):
        return None
    import shlex

    from stages import tracking

    try:
        logged = tracking.log_run(out, args.mlflow_uri, args.mlflow_experiment)
    except Exception as e:  # noqa: BLE001  (the run itself is complete; only its logging failed)
        again = shlex.join(["python", "-m", "stages.tracking", str(out), "--mlflow-uri", args.mlflow_uri,
                            "--mlflow-experiment", args.mlflow_experiment])
        print(f"mlflow: logging to {args.mlflow_uri} failed ({type(e).__name__}: {e}); the run folder is complete, "
              f"log it later with: {again}", file=sys.stderr, flush=True)
        return None
    print(logged.line(), flush=True)
    return logged


def _frozen_features(splits, out: Path, loop: TrainConfig, stage_kwargs: dict, use_gpu: bool):
    """The CE backbone (<out>/backbone), its penultimate features (<out>/features), and the head protocol: the
    split handle, TrainConfig and stage arguments every method then trains with."""
    from stages import _io, features, train

    run = _io.RunFolder(out)
    first = method_registry.backbone()
    backbone = train.fit_methods(splits, str(run.backbone), [first], loop=loop, **stage_kwargs)[first]
    print(f"backbone: val acc {backbone.final_metrics.get('val_accuracy', float('nan')):.3f} "
          f"({'reused' if backbone.reused else 'trained'}) -> {backbone.model_path}")
    feats = features.extract(features.FeatureConfig(splits_root=splits.root, out=run.features,
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
