"""Sweep stage: Ray Tune over the training config of one method, with ASHA early stopping.

One Tune trial launches one Ray Train run (the Train V2 way: the trial function builds a ``TorchTrainer``
through :func:`stages.train.fit` with ``TuneReportCallback``; with ``num_workers=0``, local mode, the trial's own
process trains and reports each epoch to Tune itself). Trials are ranked on the validation split only
(never on the pool that evaluation uses): ``val_objective`` = validation set size, plus a penalty of
10·K per unit of coverage shortfall beyond sampling noise below 1 - alpha, so a config cannot win by
under-covering. Only trials that ran every epoch can be chosen (ASHA stops the others early).

Results: ``<out>/sweep/<method>/results.parquet`` (one row per trial: config, final validation metrics, epochs
run) and ``best.json``; :class:`SweepResult` holds the same as a Polars DataFrame. ``best.json`` carries the
sweep's :func:`sweep_key`: a rerun of the same sweep reuses it instead of running every trial again. With ``mlflow_uri`` every trial
is also an MLflow run (Ray's ``MLflowLoggerCallback``, through :func:`stages.tracking.trial_callback`).

>>> sorted(default_search_space("conftr"))
['conftr_lambda', 'lr', 'temperature']
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import polars as pl

from cact_ops import methods as method_registry
from cact_ops.training import TrainConfig, val_objective  # noqa: F401  (re-exported)

from . import _io, ray_cleanup
from .storage import as_path
from .train_run import _EXECUTION_ONLY, TrainStageConfig, _relative_to_run, as_splits, jsonable

TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}


def default_search_space(method: str, loop: TrainConfig | None = None) -> dict:
    """Each method's own knobs (so every method gets the same trial budget over its own hyper-parameters).

    ``loop`` is the config the trials start from: the lr range spans a factor 10 either side of its lr (so a
    fine-tune is searched around the fine-tune lr, AdamW around AdamW's), and with ``eta_relative`` set CaCT's
    relative target is searched instead of the absolute eta (which eta_relative replaces)."""
    from ray import tune

    loop = loop or TrainConfig()
    lr = loop.lr
    entry = method_registry.get(method)
    loss = entry.loss
    space: dict[str, Any] = {"lr": tune.loguniform(lr / 10, lr * 10)}
    if loss == "conftr":
        space |= {"conftr_lambda": tune.loguniform(1e-2, 10.0), "temperature": tune.choice([0.1, 0.5, 1.0])}
    elif loss == "cact":
        space |= {"temperature": tune.choice([0.1, 0.5, 1.0]), "rho_init": tune.loguniform(0.1, 10.0),
                  "rho_step": tune.choice([0, 1, 2, 5]), "lambda_max": tune.choice([1.0, 10.0, 1e6]),
                  "val_cal_fraction": tune.choice([0.2, 0.3]), "reduction": tune.choice(["sample", "class"])}
        # the size target: relative to the backbone (the default), or absolute when eta_relative is None
        space |= ({"eta_relative": tune.choice([0.7, 0.8, 0.9, 1.0])} if loop.eta_relative is not None
                  else {"eta": tune.choice([1.0, 1.5, 2.0])})
    else:
        space |= {"weight_decay": tune.loguniform(1e-5, 1e-3)}
    if entry.search_space is not None:  # a registered method's own knobs
        space |= entry.search_space(loop)
    return space


@dataclass
class SweepConfig:
    """One Tune sweep of one method. ``base`` is the stage config every trial starts from."""

    base: TrainStageConfig = field(default_factory=TrainStageConfig)
    num_samples: int = 8  # trials (times the number of grid points when the space has a grid_search)
    search_space: dict | None = None  # TrainConfig field -> tune domain or value; None: default_search_space
    grace_period: int = 1  # ASHA: epochs every trial runs before it can be stopped
    reduction_factor: int = 2  # ASHA: keep the best 1/reduction_factor at each rung
    max_concurrent_trials: int | None = None  # None: derived from the cluster's GPUs (or CPUs) per trial
    trial_cpus: float = 0.1  # the trial function itself only waits on its TorchTrainer
    seed: int = 0  # seeds the search algorithm's sampling
    time_budget_s: float | None = None  # stop every trial after this many seconds of sweep (None: no limit)
    mlflow_uri: str | None = None  # log every trial to this MLflow tracking URI (None: no MLflow)
    mlflow_experiment: str = "cact-sweeps"  # the MLflow experiment of the trials

    def __post_init__(self):
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        unknown = set(self.search_space or {}) - TRAIN_FIELDS
        if unknown:
            raise ValueError(f"search_space keys {sorted(unknown)} are not TrainConfig fields; known: {sorted(TRAIN_FIELDS)}")


@dataclass(frozen=True)
class SweepResult:
    method: str
    results: pl.DataFrame  # one row per trial
    best_config: dict  # the TrainConfig overrides of the best trial
    best_objective: float
    path: Path
    reused: bool = False  # True when a finished sweep of the same key was found and nothing was run


def _describe(value):
    """A Tune domain (or a sampler) as plain data: its repr holds a memory address."""
    from ray.tune.search.sample import Domain

    if isinstance(value, Domain):
        d = {k: getattr(value, k) for k in ("lower", "upper", "categories") if hasattr(value, k)}
        return {"domain": type(value).__name__, **d, "sampler": _describe(value.get_sampler())}
    if hasattr(value, "__dict__") and type(value).__module__.startswith("ray."):
        return {"type": type(value).__name__, **{k: _describe(v) for k, v in vars(value).items()}}
    return value


def sweep_key(config: SweepConfig, space: dict, splits) -> str:
    """What decides a sweep's outcome: its search space, sampling and scheduling, the run every trial starts
    from (compared as the train stage compares runs: execution settings and the run folder's own path left out)
    and the split build. A rerun with the same key reuses ``best.json`` instead of sweeping again (Tune gives the
    trials new ids, so their runs are never found again)."""
    base = jsonable(config.base.to_dict())
    for k in _EXECUTION_ONLY:
        base.pop(k, None)
    _relative_to_run(base)
    doc = {"space": {k: _describe(v) for k, v in space.items()}, "num_samples": config.num_samples,
           "seed": config.seed, "grace_period": config.grace_period, "reduction_factor": config.reduction_factor,
           "time_budget_s": config.time_budget_s, "base": base, "splits": splits.manifest.get("selection_digest")}
    # default=repr: anything else (a sample_from function) has an unstable repr, so such a sweep is never reused
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=repr).encode()).hexdigest()


def _finished(out: Path, key: str, method: str) -> SweepResult | None:
    """The finished sweep of this key in ``out``, or None."""
    best_path, results = out / "best.json", out / "results.parquet"
    if not (best_path.is_file() and results.is_file()):
        return None
    best = json.loads(best_path.read_text())
    if best.get("sweep_key") != key:
        return None
    return SweepResult(method=method, results=_io.read_frame(results), best_config=best["best_config"],
                       best_objective=float(best["val_objective"]), path=results, reused=True)


def _concurrency(config: SweepConfig, per_worker_cpus: float) -> int:
    import ray

    if config.max_concurrent_trials:
        return config.max_concurrent_trials
    res = ray.cluster_resources()
    base = config.base
    workers = max(1, base.num_workers)  # local mode (0): the trial's own process trains, as one worker would
    if base.use_gpu:
        return max(1, int(res.get("GPU", 0) // workers))
    per_trial = config.trial_cpus + workers * per_worker_cpus
    return max(1, int(res.get("CPU", 1) // per_trial))


def run(splits, config: SweepConfig) -> SweepResult:
    """Run the sweep and return its results; the best config is the lowest final ``val_objective`` among the
    trials that ran every epoch (among all trials only if none did)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    splits = as_splits(splits)
    base = config.base
    method = base.method
    space = dict(config.search_space or default_search_space(method, base.loop))
    out = _io.RunFolder(base.out).sweep(method)
    key = sweep_key(config, space, splits)
    done = _finished(out, key, method)
    if done is not None:
        return done
    if not ray.is_initialized():
        ray.init()
    # Workers get a fraction of a CPU so that several trials (and their data reads) fit on a small machine.
    per_worker_cpus = base.cpus_per_worker or (0.5 if not base.use_gpu else 1.0)
    concurrency = _concurrency(config, per_worker_cpus)
    base_dict = base.to_dict()
    splits_root = str(as_path(splits.root).resolve())
    entry = method_registry.get(method)

    local = base.num_workers == 0  # local mode: the trial's own process trains and reports to Tune

    def trial(params: dict) -> None:
        from ray.tune.integration.ray_train import TuneReportCallback

        from . import train as train_stage

        method_registry.adopt(entry)  # the driver's entry: a plugin's method is not registered in a trial actor
        ctx = tune.get_context()
        loop = dataclasses.replace(TrainConfig(**base_dict["loop"]), **params)
        stage = TrainStageConfig(**{**base_dict, "loop": loop, "out": str(out / "trials" / ctx.get_trial_id()),
                                    "cpus_per_worker": per_worker_cpus, "verbose": False, "storage_path": None,
                                    "run_name": None})
        if local:
            train_stage.fit(splits_root, stage, report_to_tune=True)
        else:
            train_stage.fit(splits_root, stage, callbacks=[TuneReportCallback()])

    resources = {"CPU": config.trial_cpus}
    if local:  # the trial's own process trains: it holds one worker's share
        resources = {"CPU": config.trial_cpus + 1, "GPU": 1} if base.use_gpu else \
            {"CPU": config.trial_cpus + per_worker_cpus}
    tuner = tune.Tuner(
        tune.with_resources(trial, resources),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric="val_objective", mode="min", num_samples=config.num_samples, time_budget_s=config.time_budget_s,
            scheduler=ASHAScheduler(max_t=base.loop.epochs, grace_period=config.grace_period,
                                    reduction_factor=config.reduction_factor),
            # seeded sampling; the generator itself bounds concurrency (Tune ignores max_concurrent_trials here)
            search_alg=tune.search.BasicVariantGenerator(random_state=config.seed, max_concurrent=concurrency),
        ),
        run_config=tune.RunConfig(name=f"sweep-{method}", storage_path=str((out / "tune").resolve()),
                                  callbacks=_callbacks(config, out)),
    )
    # Tune kills each finished trial's actor, and with it the trial's Ray Train controller, before the controller
    # removes its workers' placement group: Ray Train's own cleaner frees it, and ours where that one fails.
    with ray_cleanup.orphans_released():
        grid = tuner.fit()
    rows = []
    for r in grid:
        m = r.metrics or {}
        row = {"trial_id": m.get("trial_id"), "method": method, "status": "error" if r.error else "ok",
               "epochs_run": m.get("training_iteration", 0)}
        row |= {f"config.{k}": v for k, v in (r.config or {}).items()}
        for k in ("val_objective", "val_size", "val_coverage", "val_accuracy", "lambda_max"):
            row[k] = m.get(k, math.nan)
        rows.append(row)
    df = pl.DataFrame(rows).sort("val_objective", nulls_last=True)
    ok = df.filter(pl.col("status") == "ok")
    if ok.height == 0:
        raise RuntimeError(f"every trial of the {method} sweep failed; see {out / 'tune'}")
    # The best config is trained for the full epochs afterwards, so it is chosen among the trials measured at the
    # full epochs. A trial ASHA stopped after 2 epochs is ranked on its epoch-2 metrics, which say nothing about
    # epoch 10 (it won the first sweep of docs/RESULTS.md that way). ASHA always lets at least one trial finish;
    # only when none did (time budget) the best of all is taken.
    full = ok.filter(pl.col("epochs_run") >= base.loop.epochs)
    best = (full if full.height else ok).row(0, named=True)
    best_config = {k.removeprefix("config."): v for k, v in best.items() if k.startswith("config.")}
    _io.write_parquet(df.to_arrow(), out / "results.parquet")
    _io.write_json({"method": method, "best_config": best_config, "val_objective": best["val_objective"],
                    "num_samples": config.num_samples, "metric": "val_objective (validation split only)",
                    "sweep_key": key}, out / "best.json")
    return SweepResult(method=method, results=df, best_config=best_config,
                       best_objective=float(best["val_objective"]), path=out / "results.parquet")


def _callbacks(config: SweepConfig, out: Path) -> list | None:
    """Tune callbacks: with ``mlflow_uri``, one MLflow run per trial (stages.tracking.trial_callback), tagged with
    the method, the sweep folder and the run folder's identity."""
    if not config.mlflow_uri:
        return None
    from . import tracking

    run_dir = as_path(config.base.out)
    tags = {"cact.role": "trial", "cact.method": config.base.method, "cact.sweep_dir": str(out.resolve()),
            tracking.TAG_RUN_ID: tracking.run_identity(run_dir)}
    return [tracking.trial_callback(config.mlflow_uri, config.mlflow_experiment, tags)]


def run_methods(splits, out: str, methods, loop: TrainConfig, num_samples: int, finetune_epochs: int | None = None,
                from_scratch: bool = False, seed: int = 0, mlflow_uri: str | None = None,
                mlflow_experiment: str = "cact-sweeps",
                **stage_kwargs) -> tuple[dict[str, dict], "TrainResult | None"]:
    """Sweep every method with the same trial budget, as :func:`stages.train.fit_methods` will train it.
    Returns ``({method: best_config}, backbone)``: the ``overrides`` and ``backbone`` arguments of
    ``fit_methods`` (backbone: the CE result the fine-tunes were swept from, None from scratch).

    Two-stage protocol (the default): CE is swept first (``loop.epochs``, from scratch); the CE backbone is then
    trained with CE's best config, and each conformal method is swept *as a fine-tune from that backbone*
    (``finetune_epochs``, init_from the backbone; its lr range is centred on the fine-tune lr), which is exactly
    what its best config is later used for. ``from_scratch=True`` sweeps every method from scratch for ``loop.epochs``.
    Every objective is measured on the validation split only. ``mlflow_uri``: every trial is logged to MLflow
    (experiment ``mlflow_experiment``).
    """
    from . import train as train_stage

    overrides: dict[str, dict] = {}
    backbone = None
    first = method_registry.backbone()
    for method in sorted(methods, key=lambda m: m != first):  # CE first: the fine-tunes start from its best model
        init_from = None
        if method == first:
            base = train_stage.ce_config(loop)  # keyed like the backbone fit_methods trains from its best config
        elif from_scratch and method_registry.get(method).finetune_only:
            continue  # the control exists only as a fine-tune (fit_methods skips it too)
        elif from_scratch:
            base = dataclasses.replace(loop, method=method)
        else:
            if backbone is None:
                backbone = train_stage.fit_methods(splits, out, (first,), loop=loop, overrides=overrides,
                                                   **stage_kwargs)[first]
            base, init_from = train_stage.finetune_config(loop, method, finetune_epochs), str(backbone.model_path)
        res = run(splits, SweepConfig(base=TrainStageConfig(out=out, loop=base, init_from=init_from,
                                                            **{**stage_kwargs, "overwrite": False}),
                                      num_samples=num_samples, seed=seed, mlflow_uri=mlflow_uri,
                                      mlflow_experiment=mlflow_experiment))
        overrides[method] = res.best_config
        print(f"sweep {method}: {'reused, ' if res.reused else ''}best val_objective {res.best_objective:.3f} "
              f"with {res.best_config}", flush=True)
    return overrides, backbone
