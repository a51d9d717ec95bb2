"""Experiment tracking: a finished run folder, logged to MLflow from the driver (``--mlflow-uri`` in every pipeline).

One MLflow *parent* run per run folder, one nested run per method:

* parent: params = the pipeline and its flags (``config.json``'s ``args`` and ``argv``); artifacts = ``report.md``
  (and ``report.html`` when there is one), ``eval/summary.csv``, ``plots/*.png`` and the run's ``config.json``.
* each method: params = its ``TrainConfig`` (from ``train/<method>/config.json``; the other stage fields as
  ``stage.<name>``) and the pipeline's flags as ``pipeline.<name>``; per-epoch metrics from
  ``train/<method>/metrics.parquet`` (step = epoch); its rows of ``eval/summary.parquet`` as metrics named
  ``<column>/<score>/<predictor>/alpha<alpha>`` (``coverage_mean/aps/standard/alpha0.1``); artifact: its
  ``config.json``. Non-finite values (the control's own paired differences, NaN) are not logged.

Logging reads the run folder only (no Ray) and is idempotent. Every run is tagged with the folder's identity
(``cact.run_id``: a hash of its ``.cact-run.json`` marker and its resolved path), its role and method, and a
fingerprint of what was logged. Logging the same folder again finds its runs by those tags: a run whose content
is unchanged is left as it is (no new run, no repeated metric points); one whose content changed is logged afresh
and the old one is deleted (MLflow's soft delete: ``mlflow gc`` purges it, the UI can restore it), so the
experiment holds exactly one parent and one run per method for each folder. The fingerprint tag is written
last, so a run left half-written by a crash never counts as logged and is replaced next time.

``mlflow`` is imported inside the functions only (the library and the pipelines work without it); it comes with
the ``tracking`` extra. A ``file:`` store (``file:/path/mlruns``) needs no server: MLflow 3 keeps it in
maintenance mode behind ``MLFLOW_ALLOW_FILE_STORE=true``, which is set for a file URI unless the user set it. A
server (``http://host:5000``) works with the extra's ``mlflow-skinny``; a database (``sqlite:///mlflow.db``) needs
the full ``mlflow`` package.

    python -m stages.tracking runs/digits-lt-if10-seed0 --mlflow-uri file:$PWD/mlruns

>>> metric_key("coverage_mean/aps/standard/alpha0.1"), metric_key("size|tail*")
('coverage_mean/aps/standard/alpha0.1', 'size_tail_')
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from ._io import RUN_MARKER, RunFolder
from .storage import as_path, is_uri

INSTALL_HINT = "pip install -e '.[tracking]' (the tracking extra: mlflow-skinny and pandas)"
TAG_RUN_ID, TAG_ROLE, TAG_METHOD, TAG_FINGERPRINT = "cact.run_id", "cact.role", "cact.method", "cact.fingerprint"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag
_BATCH = 100  # MLflow's log_batch takes at most 100 params / 1000 metrics per call
_MAX_PARAM = 6000  # MLflow's longest param value


def missing_mlflow() -> str | None:
    """None when MLflow can be imported, else what to install (checked before a pipeline starts Ray)."""
    if "mlflow" in sys.modules:
        return None if sys.modules["mlflow"] is not None else f"mlflow is not importable; {INSTALL_HINT}"
    try:
        found = importlib.util.find_spec("mlflow") is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"mlflow is not installed; {INSTALL_HINT}"


def is_file_store(uri: str) -> bool:
    """A local folder store (``file:/path``, ``/path``, ``mlruns``), as opposed to a server or a database."""
    scheme = urlparse(str(uri)).scheme
    return scheme in ("", "file") or len(scheme) == 1  # a Windows drive letter


def allow_file_store(uri: str) -> None:
    """MLflow 3 refuses a file store unless MLFLOW_ALLOW_FILE_STORE=true: the user asked for one, so allow it."""
    if is_file_store(uri):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def metric_key(text: str) -> str:
    """``text`` in MLflow's key charset (letters, digits, ``_ - . / : `` and space); anything else becomes ``_``."""
    return re.sub(r"[^\w\-. :/]", "_", str(text)).strip("/") or "_"


def run_identity(run_dir: str | os.PathLike) -> str:
    """The ``cact.run_id`` tag of a run folder: its marker (creation time) and its resolved path, hashed. A folder
    written before the marker existed is identified by its path alone."""
    folder = as_path(run_dir).resolve()
    try:
        marker = json.loads((folder / RUN_MARKER).read_text())
    except (OSError, ValueError):
        marker = None
    if isinstance(marker, dict) and marker.get("run_id"):
        return str(marker["run_id"])
    return _digest(json.dumps({"marker": marker, "path": str(folder)}, sort_keys=True))[:16]


def default_experiment(run_dir: str | os.PathLike) -> str:
    """``cact-<dataset>`` from the run's config.json (``cact-run`` when it names none)."""
    return f"cact-{_read_json(Path(run_dir) / 'config.json').get('pipeline') or 'run'}"


@dataclass
class LogResult:
    uri: str
    experiment: str
    experiment_id: str
    run_id: str  # the folder's cact.run_id tag
    parent_run_id: str = ""
    method_run_ids: dict[str, str] = field(default_factory=dict)
    logged: list[str] = field(default_factory=list)  # runs written this time ("run" = the parent, method names)
    unchanged: list[str] = field(default_factory=list)  # runs already logged with the same content
    replaced: list[str] = field(default_factory=list)  # logged afresh over an earlier, different version

    def line(self) -> str:
        what = (f"logged {', '.join(self.logged)}" if self.logged else "") + \
            ("; " if self.logged and self.unchanged else "") + \
            (f"unchanged {', '.join(self.unchanged)}" if self.unchanged else "")
        return (f"mlflow: experiment {self.experiment!r} at {self.uri}: run {self.parent_run_id} with "
                f"{len(self.method_run_ids)} method runs ({what})")


@dataclass
class _Record:
    """What one MLflow run holds: its name, params, metrics (key, value, step), artifacts (file, folder) and tags."""

    name: str
    params: dict[str, str] = field(default_factory=dict)
    metrics: list[tuple[str, float, int]] = field(default_factory=list)
    artifacts: list[tuple[Path, str | None]] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)

    def fingerprint(self) -> str:
        files = [(p.name, folder, _digest(p.read_bytes())) for p, folder in self.artifacts]
        return _digest(json.dumps([self.name, self.params, self.metrics, files, self.tags], sort_keys=True))


def log_run(run_dir: str | os.PathLike, uri: str, experiment: str | None = None) -> LogResult:
    """Log a run folder to the MLflow tracking store at ``uri`` (experiment default ``cact-<dataset>``): one parent
    run, one nested run per method; a folder logged before is updated, never duplicated (module docstring)."""
    if is_uri(run_dir):
        raise ValueError(f"run_dir={str(run_dir)!r} is a URI: MLflow logs local files, so log a local copy of the "
                         "run folder (e.g. aws s3 sync <uri> runs/<name>)")
    run_dir = Path(run_dir)
    parent, children = _records(run_dir)
    allow_file_store(uri)
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    experiment = experiment or default_experiment(run_dir)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is not None and exp.lifecycle_stage == "deleted":
        raise RuntimeError(f"MLflow experiment {experiment!r} at {uri} is deleted: restore it (mlflow experiments "
                           "restore) or choose another with --mlflow-experiment")
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    rid = run_identity(run_dir)
    found = client.search_runs([exp_id], f"tags.`{TAG_RUN_ID}` = '{rid}'", run_view_type=ViewType.ACTIVE_ONLY,
                               max_results=10_000)
    res = LogResult(uri, experiment, exp_id, rid)
    common = {TAG_RUN_ID: rid, "cact.run_dir": str(run_dir.resolve())}

    old_parents = [r for r in found if r.data.tags.get(TAG_ROLE) == "pipeline"]
    res.parent_run_id, stale = _keep_or_log(client, exp_id, parent, old_parents,
                                            {**common, TAG_ROLE: "pipeline"}, res, "run")
    by_method: dict[str, list] = {}
    for r in found:
        if r.data.tags.get(TAG_ROLE) == "method":
            by_method.setdefault(r.data.tags.get(TAG_METHOD, ""), []).append(r)
    for method, rec in children.items():
        tags = {**common, TAG_ROLE: "method", TAG_METHOD: method, PARENT_TAG: res.parent_run_id}
        run_id, old = _keep_or_log(client, exp_id, rec, by_method.pop(method, []), tags, res, method)
        stale += old
        res.method_run_ids[method] = run_id
    stale += [r for runs in by_method.values() for r in runs]  # methods no longer in the folder
    for run_id in dict.fromkeys(stale):
        client.delete_run(run_id)
    return res


def _keep_or_log(client, exp_id: str, rec: _Record, existing: list, tags: dict, res: LogResult,
                 label: str) -> tuple[str, list[str]]:
    """Keep the existing run with the same content (re-nested under ``tags``' parent if that changed) or log a
    new one; returns its id and the ids of the runs it supersedes."""
    fp = _Record(rec.name, rec.params, rec.metrics, rec.artifacts, {**rec.tags, **_content_tags(tags)}).fingerprint()
    same = [r for r in existing if r.data.tags.get(TAG_FINGERPRINT) == fp]
    if same:
        keep = same[0]
        if PARENT_TAG in tags and keep.data.tags.get(PARENT_TAG) != tags[PARENT_TAG]:
            client.set_tag(keep.info.run_id, PARENT_TAG, tags[PARENT_TAG])
        res.unchanged.append(label)
        return keep.info.run_id, [r.info.run_id for r in existing if r is not keep]
    run_id = _write(client, exp_id, rec, tags)
    client.set_tag(run_id, TAG_FINGERPRINT, fp)  # last: a run without it was not finished and is replaced
    res.logged.append(label)
    if existing:
        res.replaced.append(label)
    return run_id, [r.info.run_id for r in existing]


def _content_tags(tags: dict) -> dict:
    """The tags that describe the content (not where the run hangs: the parent id changes when the parent does)."""
    return {k: v for k, v in tags.items() if k != PARENT_TAG}


def _write(client, exp_id: str, rec: _Record, tags: dict) -> str:
    from mlflow.entities import Metric, Param

    run = client.create_run(exp_id, run_name=rec.name,
                            tags={**tags, **rec.tags, "mlflow.source.name": "stages.tracking"})
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in rec.params.items()]
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, step) for k, v, step in rec.metrics]
    for i in range(0, len(params), _BATCH):
        client.log_batch(run_id, params=params[i:i + _BATCH])
    for i in range(0, len(metrics), 10 * _BATCH):
        client.log_batch(run_id, metrics=metrics[i:i + 10 * _BATCH])
    for path, folder in rec.artifacts:
        client.log_artifact(run_id, str(path), folder)
    client.set_terminated(run_id, "FINISHED")
    return run_id


# ----------------------------------------------------------------------------------------------------------
# Reading the run folder


def _records(run_dir: Path) -> tuple[_Record, dict[str, _Record]]:
    """The parent's record and one per method (registry order), from the run folder's files only."""
    import polars as pl

    from cact_ops import methods as method_registry

    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a folder: give a CaCT run folder (runs/<dataset>-lt-...)")
    run = RunFolder(run_dir)
    config = _read_json(run.config)
    args = config.get("args") or {}
    summary_path = run.eval_file("summary.parquet")
    summary = pl.read_parquet(summary_path) if summary_path.is_file() else None
    methods = {p.parent.name for p in run.train.glob("*/config.json")}
    if summary is not None:
        methods |= set(summary["method"].unique().to_list())
    if not methods:
        raise FileNotFoundError(f"{run_dir} holds no finished method (no train/<method>/config.json and no "
                                "eval/summary.parquet): nothing to log")

    pipeline_params = {"pipeline": config.get("pipeline"), **args}
    if "argv" in config:
        pipeline_params["argv"] = shlex.join(str(a) for a in config["argv"])
    parent = _Record(run_dir.name, params=_params(pipeline_params),
                     tags={"cact.dataset": str(config.get("pipeline") or "")})
    parent.artifacts += [(p, None) for p in (run.config, run.report, run.report_html) if p.is_file()]
    if run.eval_file("summary.csv").is_file():
        parent.artifacts.append((run.eval_file("summary.csv"), "eval"))
    parent.artifacts += [(p, "plots") for p in sorted(run.plots.glob("*.png"))]

    children = {}
    for method in sorted(methods, key=method_registry.order_key):
        d = run.method(method)
        stage = _read_json(d / "config.json")
        loop = stage.pop("loop", {}) or {}
        rec = _Record(method, params=_params({**loop, **{f"stage.{k}": v for k, v in stage.items()},
                                              **{f"pipeline.{k}": v for k, v in pipeline_params.items()}}))
        if (d / "metrics.parquet").is_file():
            rec.metrics += _epoch_metrics(pl.read_parquet(d / "metrics.parquet"))
        if summary is not None:
            rec.metrics += _summary_metrics(summary.filter(pl.col("method") == method))
        if (d / "config.json").is_file():
            rec.artifacts.append((d / "config.json", None))
        children[method] = rec
    return parent, children


def _epoch_metrics(metrics) -> list[tuple[str, float, int]]:
    """Every numeric column of metrics.parquet, one point per epoch (step = epoch)."""
    cols = [c for c, t in metrics.schema.items() if t.is_numeric() and c != "epoch"]
    out = []
    for i, row in enumerate(metrics.iter_rows(named=True)):
        step = int(row["epoch"]) if row.get("epoch") is not None else i
        out += [(metric_key(c), float(row[c]), step) for c in cols if _finite(row[c])]
    return out


def _summary_metrics(rows) -> list[tuple[str, float, int]]:
    """A method's summary rows: ``<column>/<score>/<predictor>/alpha<alpha>`` for every numeric column."""
    cols = [c for c, t in rows.schema.items() if t.is_numeric() and c != "alpha"]
    out = []
    for row in rows.iter_rows(named=True):
        where = f"{row.get('score')}/{row.get('predictor')}/alpha{row['alpha']:g}"
        out += [(metric_key(f"{c}/{where}"), float(row[c]), 0) for c in cols if _finite(row[c])]
    return out


def _params(values: dict) -> dict[str, str]:
    """Param values as MLflow stores them: strings (lists and dicts as JSON), at most 6000 characters."""
    out = {}
    for k, v in values.items():
        text = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
        out[metric_key(k)] = text[:_MAX_PARAM]
    return out


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _digest(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Ray Tune: one MLflow run per trial


def trial_callback(uri: str, experiment: str, tags: dict | None = None):
    """Ray Tune's ``MLflowLoggerCallback`` for ``RunConfig(callbacks=[...])``: one MLflow run per trial (its
    sampled config as params, every reported result as metrics at step = training iteration), from the driver."""
    missing = missing_mlflow()
    if missing:
        raise RuntimeError(f"MLflow logging of the sweep trials: {missing}")
    allow_file_store(uri)
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return MLflowLoggerCallback(tracking_uri=uri, experiment_name=experiment, tags=dict(tags or {}))


# ----------------------------------------------------------------------------------------------------------
# python -m stages.tracking RUN_DIR --mlflow-uri URI


def main(argv: list[str] | None = None) -> LogResult:
    p = argparse.ArgumentParser(prog="python -m stages.tracking",
                                description="Log a finished CaCT run folder to MLflow (again: unchanged runs are "
                                            "kept, changed ones replaced, never duplicated).")
    p.add_argument("run_dir", help="the run folder (runs/<dataset>-lt-if<IF>-seed<seed>)")
    p.add_argument("--mlflow-uri", required=True,
                   help="MLflow tracking URI: file:/abs/path/mlruns, http://host:5000, or with the full mlflow "
                        "package sqlite:///mlflow.db")
    p.add_argument("--mlflow-experiment", default=None, help="experiment name (default: cact-<dataset>)")
    args = p.parse_args(argv)
    missing = missing_mlflow()
    if missing:
        raise SystemExit(f"--mlflow-uri: {missing}")
    try:
        res = log_run(args.run_dir, args.mlflow_uri, args.mlflow_experiment)
    except FileNotFoundError as e:
        raise SystemExit(str(e))
    print(res.line())
    return res


if __name__ == "__main__":
    main()
