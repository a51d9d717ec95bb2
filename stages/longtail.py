"""Long-tail stage: profiles, balanced val/pool splits, Parquet files and a manifest (DESIGN.md section 2).

Protocol. The ``train`` split is a long-tailed subset of the source's official training split; ``val`` (for
CaCT's dual step) and ``pool`` (what evaluation splits into calibration/test) come from the official test
split: ``val`` is a stratified ``val_fraction`` of it (seeded), ``pool`` the rest; both are balanced as the
test split is, and disjoint. ImageNet-LT (``profile="lists"``) takes its official train/val/test lists.

Profiles, for class index k = 0..K-1 (classes in the source's order):

- ``exponential`` (default; LDAM / CIFAR-LT): ``n_k = floor(n_max * IF^(-k/(K-1)))``. With ``selection="first"``
  the first ``n_k`` examples of class k in official order are taken, so CIFAR-10-LT IF=100 is the published
  subset (5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50; 12406 images).
- ``step``: the last ``round(step_minority_fraction * K)`` classes get ``floor(n_max / IF)``, the others ``n_max``.
- ``lists``: the ImageNet-LT list files define every split exactly (IF in the manifest is then measured).

``IF = 1`` gives the balanced set. ``n_max`` defaults to the largest value every class can supply (e.g. 5000
on CIFAR-10; 5923 on MNIST, whose class 0 has 5923 images). Digits has no official test split: see
:class:`stages.ingest.DigitsSource` for its fixed 50/50 rule.

Split folder contract (other stages rely on it)::

    <out>/manifest.json
    <out>/train/part-00000.parquet ...   (one folder of shards per split: train/, val/, pool/)
    <out>/vocab.json                     (tokens payload only)

Columns: ``sample_id`` int64 (unique across the source, stable), ``label`` int64, then the payload:

- kind ``"image"``: ``image`` (binary, encoded JPEG/PNG) and ``path`` (string, for imagefolder sources);
  ``payload.shape`` = [H, W, C] when all images share a size, else null; ``payload.channels`` 1 or 3.
- kind ``"pixels"``: ``pixels`` (binary, raw uint8 row-major HxWxC); ``payload.shape`` always set.
- kind ``"tokens"``: ``text`` (raw string), ``tokens`` (list<int32>; 0 = padding, 1 = unknown, vocabulary fit
  on the train split only, ``vocab.json``), ``path``; ``payload.vocab_size`` counts the two reserved ids.

Each Parquet file's schema metadata holds JSON under ``b"cact"``: dataset, classes, split and the payload
encoding. ``manifest.json`` holds: ``dataset``, ``classes``, ``num_classes``, ``profile``,
``imbalance_factor``, ``n_max``, ``selection``, ``seed``, ``val_fraction``, ``counts`` (per split, per class),
``available`` (per class in the official source splits), ``payload``, ``files`` (each split's folder),
``shards`` (each split's files in row order), ``sources``,
``source_options``, ``checksums`` (``sources``: sha256 of source files; ``splits``: sha256 of the written
files), ``selection_digest`` (sha256 of each split's sample ids), ``skipped`` (corrupt images skipped),
``code_version``, ``model_family`` ("small_cnn", "cifar_resnet", "imagenet_resnet" or "text").

Build properties: selections are made on labels-only tables (numpy) on the driver; the chosen rows are then
read, verified and written shard by shard by Ray Data tasks across the cluster (or this process for small
builds; :mod:`stages.shards`), memory bounded by one row group per task. The same inputs and seed give
byte-identical files and manifest, whatever the parallelism. A build writes into hidden sibling folders,
resumes there after a crash with the missing shards only, and renames the folder into place when complete. Rebuilding into an existing folder reuses it when its manifest describes the
same build (same plan, files intact) and refuses otherwise; it never appends.

>>> from stages.longtail import exponential_counts
>>> exponential_counts(5000, 10, 100)
[5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import math
import numbers
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from stages import ingest, shards
from stages._io import move_folder, refuse_uri, remove_tree, sha256_file, write_json, write_text
from stages.ingest import SourceSpec
from stages.storage import as_path, file_sizes
# The reader of a split folder, which every stage uses, lives in stages.splits; these names stay here too.
from stages.splits import SPLITS, ManifestError, Splits, load  # noqa: F401

log = logging.getLogger(__name__)

PROFILES = ("exponential", "step", "lists")
SELECTIONS = ("first", "random")
ON_CORRUPT = ("fail", "skip")
FORMAT_VERSION = 2  # 2: each split is a folder of shards
# Keys that define a build: an existing folder is reused only when all of them match.
PLAN_KEYS = ("format_version", "dataset", "classes", "profile", "imbalance_factor", "n_max", "selection",
             "seed", "val_fraction", "step_minority_fraction", "planned_counts", "selection_digest",
             "sources", "source_options", "build_options", "checksums.sources")


@dataclass(frozen=True)
class LongTailConfig(SourceSpec):
    """One long-tailed split build: a :class:`stages.ingest.SourceSpec` (where the data is) and how to split it.

    Source fields (see :class:`stages.ingest.SourceSpec`, checked on construction): ``dataset`` (default ``"digits"``, needs no files),
    ``data_root``, ``train_split``/``test_split``, ImageNet-LT ``train_list``/``val_list``/``test_list``,
    ``label_kind`` (CIFAR-100 "fine"/"coarse"), ``strip_headers`` (newsgroups), ``image_column``,
    ``label_column``, ``chunk_rows``.

    Attributes:
        out: the split folder to write (required).
        profile: "exponential" (default), "step" or "lists" (ImageNet-LT list files).
        imbalance_factor: IF = n_max / n_min >= 1 (default 100; 1 = balanced). Ignored by "lists".
        n_max: head-class count; default None = the largest every class can supply.
        step_minority_fraction: "step" only: fraction of classes (the last ones) that are minority (0.5).
        val_fraction: fraction of the official test split, per class, that forms ``val`` (0.2); in (0, 1).
        selection: "first" (default: first n_k per class in official order) or "random" (seeded).
        seed: seeds the random train selection and the val/pool split (0).
        on_corrupt: "fail" (default) or "skip" a corrupt image (skips are logged and listed in the manifest).
        verify_images: fully decode every written image to detect corruption (True); False only parses headers.
        vocab_size, vocab_min_count: tokens payload: vocabulary cap (20000) and minimum train count (2).
        row_group_rows: rows per Parquet row group; default by payload (512 images, 8192 otherwise).
        shard_rows: rows per shard file (one task each); default by payload (2048 images, 65536 otherwise).
        executor: who writes the shards: "ray" (Ray Data tasks across the cluster), "local" (this process) or
            "auto" (default: Ray Data when Ray is running and some split has more than one shard). Never
            changes the files.
        max_cpus: at most this many shard tasks at once with Ray Data (default None: as many as fit).

    >>> LongTailConfig(out="runs/digits-lt", imbalance_factor=10).profile
    'exponential'
    """

    out: str | None = None
    profile: str = "exponential"
    imbalance_factor: float = 100
    n_max: int | None = None
    step_minority_fraction: float = 0.5
    val_fraction: float = 0.2
    selection: str = "first"
    seed: int = 0
    on_corrupt: str = "fail"
    verify_images: bool = True
    vocab_size: int = 20000
    vocab_min_count: int = 2
    row_group_rows: int | None = None
    shard_rows: int | None = None
    executor: str = "auto"
    max_cpus: int | None = None

    def source_spec(self) -> SourceSpec:
        names = {f.name for f in dataclasses.fields(SourceSpec)}
        return SourceSpec(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and its accepted values."""
        if not self.out:
            raise ValueError("out: the split folder to write is required")
        for name in ("data_root", "train_list", "val_list", "test_list"):  # out may be a URI (stages.storage)
            refuse_uri(getattr(self, name), name)
        if self.profile not in PROFILES:
            raise ValueError(f"profile={self.profile!r}; accepted: {', '.join(PROFILES)}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection={self.selection!r}; accepted: {', '.join(SELECTIONS)}")
        if self.on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt={self.on_corrupt!r}; accepted: {', '.join(ON_CORRUPT)}")
        if not (isinstance(self.imbalance_factor, numbers.Real) and math.isfinite(self.imbalance_factor)
                and self.imbalance_factor >= 1):
            raise ValueError(f"imbalance_factor={self.imbalance_factor!r}; accepted: a finite number >= 1 "
                             "(1 = balanced)")
        if not (isinstance(self.val_fraction, numbers.Real) and 0 < self.val_fraction < 1):
            raise ValueError(f"val_fraction={self.val_fraction!r}; accepted: a number in the open interval (0, 1)")
        if not 0 < self.step_minority_fraction < 1:
            raise ValueError(f"step_minority_fraction={self.step_minority_fraction!r}; accepted: (0, 1)")
        if self.n_max is not None and (not isinstance(self.n_max, numbers.Integral) or self.n_max < 1):
            raise ValueError(f"n_max={self.n_max!r}; accepted: None (largest available) or an integer >= 1")
        if self.profile == "lists" and (self.dataset != "imagefolder" or not self.train_list):
            raise ValueError("profile='lists' needs dataset='imagefolder' and train_list (ImageNet-LT list files)")
        if not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"seed={self.seed!r}; accepted: an integer")
        if self.vocab_size < 1 or self.vocab_min_count < 1:
            raise ValueError("vocab_size and vocab_min_count must be >= 1")
        for name in ("row_group_rows", "shard_rows", "max_cpus"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, numbers.Integral) or v < 1):
                raise ValueError(f"{name}={v!r}; accepted: None or an integer >= 1")
        if self.executor not in shards.EXECUTORS:
            raise ValueError(f"executor={self.executor!r}; accepted: {', '.join(shards.EXECUTORS)}")


# ----------------------------------------------------------------------------------------------------------
# Profiles and selection (plain numpy on labels-only tables)


def exponential_counts(n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """LDAM/CIFAR-LT profile ``n_k = floor(n_max * IF^(-k/(K-1)))``.

    Written as ``n_max * (1/IF)^(k/(K-1))`` exactly as the reference code, so that floors match the
    published subsets bit for bit.

    >>> sum(exponential_counts(5000, 10, 10)), sum(exponential_counts(500, 100, 100))
    (20431, 10847)
    """
    if num_classes == 1:
        return [int(n_max)]
    return [int(n_max * (1.0 / imbalance_factor) ** (k / (num_classes - 1.0))) for k in range(num_classes)]


def step_counts(n_max: int, num_classes: int, imbalance_factor: float, minority_fraction: float = 0.5) -> list[int]:
    """Step profile: the last ``round(minority_fraction * K)`` classes get ``floor(n_max / IF)``.

    >>> step_counts(100, 4, 10)
    [100, 100, 10, 10]
    """
    n_minor = int(round(minority_fraction * num_classes))
    return [int(n_max) if k < num_classes - n_minor else int(n_max / imbalance_factor) for k in range(num_classes)]


def profile_counts(profile: str, n_max: int, num_classes: int, imbalance_factor: float,
                   minority_fraction: float = 0.5) -> list[int]:
    """Per-class counts of the ``exponential`` or ``step`` profile."""
    if profile == "exponential":
        return exponential_counts(n_max, num_classes, imbalance_factor)
    if profile == "step":
        return step_counts(n_max, num_classes, imbalance_factor, minority_fraction)
    raise ValueError(f"profile={profile!r} has no formula; accepted: exponential, step")


def largest_n_max(available: Sequence[int], profile: str, imbalance_factor: float,
                  minority_fraction: float = 0.5) -> int:
    """The largest ``n_max`` whose profile every class can supply (0 if none).

    >>> largest_n_max([5923, 6742, 5958], "exponential", 10)
    5923
    """
    def fits(n: int) -> bool:
        req = profile_counts(profile, n, len(available), imbalance_factor, minority_fraction)
        return all(r <= a for r, a in zip(req, available))

    lo, hi = 0, int(max(available, default=0))
    while lo < hi:  # counts grow with n_max: binary search the last feasible value
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def class_rank(labels: np.ndarray, num_classes: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Rank of each row within its class: official order, or a seeded random order when ``rng`` is given.

    >>> class_rank(np.array([1, 0, 1, 1, 0]), 2).tolist()
    [0, 0, 1, 2, 1]
    """
    n = len(labels)
    if rng is None:
        order = np.argsort(labels, kind="stable")
    else:
        order = np.lexsort((rng.random(n), labels))
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, np.arange(num_classes))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - starts[sorted_labels]
    return rank


def _rng(seed: int, stream: int) -> np.random.Generator:
    # Independent streams for the train selection and the val/pool split: changing one never shifts the other.
    return np.random.default_rng(np.random.SeedSequence([int(seed), stream]))


def _ids_digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()


def code_version() -> dict:
    """Package version and git commit (None when unavailable)."""
    try:
        version = importlib.metadata.version("cact")
    except importlib.metadata.PackageNotFoundError:
        version = None
    commit = None
    repo = Path(__file__).resolve().parents[1]
    if (repo / ".git").exists():
        try:
            r = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                               timeout=10)
            commit = r.stdout.strip() or None if r.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"package": "cact", "version": version, "git_commit": commit}


def model_family(dataset: str, payload: dict) -> str:
    """Which model family suits the data: small_cnn, cifar_resnet, imagenet_resnet or text."""
    if payload["kind"] == "tokens":
        return "text"
    if dataset in ("digits", "mnist"):
        return "small_cnn"
    if dataset in ("cifar10", "cifar100"):
        return "cifar_resnet"
    shape = payload.get("shape")
    if not shape:
        return "imagenet_resnet"  # varied sizes: full-size photos
    h, w, c = shape
    if min(h, w) >= 64:
        return "imagenet_resnet"
    return "small_cnn" if c == 1 and max(h, w) <= 28 else "cifar_resnet"


# ----------------------------------------------------------------------------------------------------------
# Plan: everything decided before a byte is written


@dataclass
class Plan:
    """The build decided on labels only: the source, the chosen sample ids and the manifest core."""

    source: ingest.Source
    ids: dict[str, np.ndarray]  # split -> sorted sample ids
    origin: dict[str, str]  # split -> official source split it is read from
    manifest: dict


def plan(config: LongTailConfig) -> Plan:
    """Validate the config and the source, and choose every split's rows from labels alone (writes nothing).

    >>> p = plan(LongTailConfig(out="unused", imbalance_factor=10))
    >>> p.manifest["counts"]["train"]
    [89, 68, 53, 41, 31, 24, 19, 14, 11, 8]
    """
    config.validate()
    src = ingest.open_source(config.source_spec())
    K = src.num_classes
    lab = {s: src.labels(s) for s in src.splits}
    y = {s: t.column("label").to_numpy() for s, t in lab.items()}
    sid = {s: t.column("sample_id").to_numpy() for s, t in lab.items()}
    available = {s: np.bincount(y[s], minlength=K).tolist() for s in src.splits}
    train_avail = available["train"]
    names = src.classes

    if config.profile == "lists":
        mask = np.ones(len(y["train"]), dtype=bool)
        nz = [c for c in train_avail if c > 0]
        imbalance = round(max(nz) / min(nz), 6) if nz else None
        n_max = max(train_avail)
        requested = train_avail
    else:
        # 100 and 100.0 (or numpy scalars) are the same build: one JSON spelling for the manifest.
        imbalance = float(config.imbalance_factor)
        imbalance = int(imbalance) if imbalance.is_integer() else imbalance
        n_max = config.n_max
        if n_max is None:
            n_max = largest_n_max(train_avail, config.profile, imbalance, config.step_minority_fraction)
        requested = profile_counts(config.profile, n_max, K, imbalance, config.step_minority_fraction)
        for k, (r, a) in enumerate(zip(requested, train_avail)):
            if r > a:
                most = largest_n_max(train_avail, config.profile, imbalance, config.step_minority_fraction)
                raise ValueError(
                    f"class {names[k]!r} (index {k}) needs {r} training examples ({config.profile} profile, "
                    f"IF={imbalance}, n_max={n_max}) but the source's train split has only {a}; lower n_max "
                    f"(accepted: <= {most}) or leave it unset")
            if r < 1:
                raise ValueError(
                    f"class {names[k]!r} (index {k}) would get 0 training examples (n_max={n_max}, "
                    f"IF={imbalance}); use imbalance_factor <= {n_max} or a larger n_max")
        rank = class_rank(y["train"], K, _rng(config.seed, 0) if config.selection == "random" else None)
        mask = rank < np.asarray(requested)[y["train"]]

    ids = {"train": sid["train"][mask]}
    origin = {"train": "train"}
    if "val" in src.splits:  # official val list (ImageNet-LT)
        ids["val"], ids["pool"] = sid["val"], sid["test"]
        origin.update(val="val", pool="test")
        rules = {"val": "the official val list", "pool": "the official test split/list"}
    else:
        m = np.bincount(y["test"], minlength=K)
        n_val = np.floor(config.val_fraction * m + 0.5).astype(np.int64)
        vrank = class_rank(y["test"], K, _rng(config.seed, 1))
        vmask = vrank < n_val[y["test"]]
        ids["val"], ids["pool"] = sid["test"][vmask], sid["test"][~vmask]
        origin.update(val="test", pool="test")
        rules = {"val": f"stratified {config.val_fraction} of the official test split per class (seeded random)",
                 "pool": "the rest of the official test split"}
    if config.profile == "lists":
        rules["train"] = "the official train list"
    elif config.selection == "first":
        rules["train"] = f"{config.profile} profile: the first n_k of each class in official order"
    else:
        rules["train"] = f"{config.profile} profile: n_k of each class chosen at random (seeded)"
    counts = {}
    for split in SPLITS:
        o = origin[split]
        sel = np.isin(sid[o], ids[split], assume_unique=True)
        counts[split] = np.bincount(y[o][sel], minlength=K).tolist()
    for split, fix in (("val", "a larger val_fraction (--val-fraction)"), ("pool", "a smaller val_fraction "
                                                                                  "(--val-fraction)")):
        # A class absent from D_val never moves its multiplier; one absent from the pool gets no class-wise
        # threshold and drops out of CovGap: results that look fine and are not.
        empty = [f"{names[k]!r} (index {k})" for k, c in enumerate(counts[split]) if c == 0]
        if empty:
            hint = "" if config.profile == "lists" else f"; use {fix}"
            raise ValueError(f"the {split} split ({rules[split]}) would hold no example of class "
                             f"{', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''} "
                             f"({len(empty)} of {K} classes){hint}")

    spec = config.source_spec()
    source_options = {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("dataset", "data_root",
                                                                                    "chunk_rows")}
    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset": src.dataset,
        "classes": list(names),
        "num_classes": K,
        "profile": config.profile,
        "imbalance_factor": imbalance,
        "n_max": int(n_max),
        "step_minority_fraction": float(config.step_minority_fraction) if config.profile == "step" else None,
        "selection": config.selection,
        "seed": int(config.seed),
        "val_fraction": float(config.val_fraction),
        "split_rules": rules,
        "available": available,
        "planned_counts": counts,
        "counts": counts,
        "selection_digest": {s: _ids_digest(ids[s]) for s in SPLITS},
        "sources": src.sources(),
        "source_options": source_options,
        "build_options": {"on_corrupt": config.on_corrupt, "verify_images": config.verify_images,
                          **dict(zip(("shard_rows", "row_group_rows"), _layout(config, src.payload["kind"]))),
                          **({"vocab_size": config.vocab_size, "vocab_min_count": config.vocab_min_count}
                             if src.payload["kind"] == "text" else {})},
        "checksums": {"sources": src.checksums()},
        "files": {s: s for s in SPLITS},  # a folder of shards each; the list goes in "shards"
    }
    return Plan(source=src, ids={s: np.sort(v) for s, v in ids.items()}, origin=origin, manifest=manifest)


# ----------------------------------------------------------------------------------------------------------
# Writing: the row work runs in stages.shards (Ray Data tasks, or this process for small builds)


def _layout(config: LongTailConfig, kind: str) -> tuple[int, int]:
    """(shard_rows, row_group_rows) of a build: they fix the files' bytes, so they are part of the plan."""
    rows = config.row_group_rows or (512 if kind == "image" else 8192)
    return config.shard_rows or shards.SHARD_ROWS.get(kind, shards.DEFAULT_SHARD_ROWS), rows


def _write_all(p: Plan, config: LongTailConfig, folder: Path, records: Path) -> dict:
    """Write every split's shards into ``folder`` (resuming from ``records``); returns the manifest updates
    (counts, payload, shard lists, checksums, skipped)."""
    src, man = p.source, p.manifest
    kind = src.payload["kind"]
    payload = dict(src.payload)
    vocab_index = None
    if kind == "text":
        from stages import payload as codec

        texts = (t for batch in src.iter_batches(p.origin["train"], p.ids["train"])
                 for t in batch.column("text").to_pylist())
        vocab = codec.fit_vocab(texts, max_size=config.vocab_size, min_count=config.vocab_min_count)
        vocab_index = {tok: i + 2 for i, tok in enumerate(vocab)}
        write_json(codec.vocab_document(vocab, config.vocab_size, config.vocab_min_count), folder / "vocab.json")
        payload = {"kind": "tokens", "column": "tokens", "text_column": "text", "shape": None,
                   "vocab": "vocab.json", "vocab_size": len(vocab) + 2, "pad_id": codec.PAD_ID,
                   "unk_id": codec.UNK_ID, "max_tokens": codec.DEFAULT_MAX_TOKENS}
    schemas = {}
    encoding = {k: v for k, v in payload.items() if k != "shape" or kind == "pixels"}
    for origin in dict.fromkeys(p.origin.values()):
        fields = list(src.read_rows(origin, 0, 1).schema)
        if kind == "text":
            i = [f.name for f in fields].index("text") + 1
            fields.insert(i, pa.field("tokens", pa.list_(pa.int32())))
        for s in (s for s in SPLITS if p.origin[s] == origin):
            meta = {"dataset": src.dataset, "classes": src.classes, "split": s, "payload": encoding}
            schemas[s] = pa.schema(fields, metadata={b"cact": json.dumps(meta, sort_keys=True).encode()})
    shard_rows, row_group_rows = _layout(config, kind)
    writer = shards.ShardWriter(src, p.ids, p.origin, schemas, folder, records, shard_rows, row_group_rows,
                                config.on_corrupt, config.verify_images, vocab_index)
    done = shards.run(writer, config.executor, config.max_cpus)
    skipped = [row for r in done for row in r["skipped"]]
    if kind == "image":
        stats = shards.ImageStats()
        for r in done:
            stats.merge(r)
        payload = stats.payload()
    if skipped:
        log.warning("skipped %d corrupt image(s) (on_corrupt='skip'); first: %s", len(skipped), skipped[0]["where"])
    counts = {s: np.sum([r["counts"] for r in done if r["split"] == s], axis=0).tolist() for s in SPLITS}
    checks = {r["file"]: r["sha256"] for r in done}
    sizes = {r["file"]: r["bytes"] for r in done}
    if kind == "text":
        checks["vocab.json"] = sha256_file(folder / "vocab.json")
        sizes["vocab.json"] = (folder / "vocab.json").stat().st_size
    return {"counts": counts, "payload": payload, "skipped": skipped,
            "shards": {s: [r["file"] for r in done if r["split"] == s] for s in SPLITS},
            "checksums": {"sources": man["checksums"]["sources"], "splits": checks, "bytes": sizes}}


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True)


def _existing(out: Path, manifest: dict) -> "Splits | None":
    """Reuse ``out`` when it holds the same build; refuse when it holds anything else; None if absent/empty."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise FileExistsError(f"out={out} exists and is not a folder; choose another out folder")
    if not any(out.iterdir()):
        return None
    mpath = out / "manifest.json"
    if not mpath.is_file():
        raise FileExistsError(f"out={out} is not empty and has no manifest.json: not a split build; refusing to "
                              "write into it (choose another out folder or delete it)")
    existing = load(out)
    old = existing.manifest
    new = json.loads(_canonical(manifest))
    diff = [k for k in PLAN_KEYS if _canonical(_get(old, k)) != _canonical(_get(new, k))]
    if diff:
        raise FileExistsError(f"out={out} holds a different split build (manifest differs in: {', '.join(diff)}); "
                              "refusing to overwrite it: choose another out folder or delete it")
    recorded = old.get("checksums", {})
    if recorded.get("bytes"):
        # Sizes from one listing: a rerun (a pipeline resumed after a crash) does not read the splits again, which
        # on ImageNet is 140 GB from a shared filesystem or a bucket. A same-size edit goes unnoticed, as in make.
        found = file_sizes(out)
        for name, size in recorded["bytes"].items():
            if found.get(name) != size:
                what = "is missing" if name not in found else f"has {found[name]} bytes, not {size}"
                raise FileExistsError(f"{out / name} {what} (per {mpath}); the folder was modified: delete it to "
                                      "rebuild")
    else:  # a build from before sizes were recorded: its files are hashed
        for name, digest in (recorded.get("splits") or {}).items():
            if sha256_file(out / name) != digest:
                raise FileExistsError(f"{out / name}: sha256 differs from {mpath}; the folder was modified: "
                                      "delete it to rebuild")
    return existing


def _partial(out: Path, manifest: dict) -> tuple[Path, Path]:
    """The hidden sibling folders a build writes into: ``(folder, records)``, resumed when their plan is this
    build's, started afresh (with a warning) when it is another's; refused when they are not a build's."""
    folder, records = out.with_name(f".{out.name}.partial"), out.with_name(f".{out.name}.records")
    marker = records / "plan.json"
    plan_text = _canonical(manifest)
    if marker.is_file():
        if marker.read_text() == plan_text:
            return folder, records
        log.warning("%s holds an interrupted build of another plan; starting this one afresh", folder)
        remove_tree(folder)
        remove_tree(records)
    elif folder.exists() or records.exists():
        raise FileExistsError(f"{folder if folder.exists() else records} exists but holds no build plan "
                              f"({marker} is missing); it was not written by this project or was modified: "
                              "delete it or choose another out folder")
    records.mkdir(parents=True)
    write_text(plan_text, marker)  # compared as text on resume
    folder.mkdir(exist_ok=True)
    return folder, records


def build(config: LongTailConfig) -> "Splits":
    """Build (or reuse, or resume) a long-tailed split folder and return its handle.

    >>> import tempfile, os
    >>> tmp = tempfile.TemporaryDirectory()
    >>> s = build(LongTailConfig(out=os.path.join(tmp.name, "digits-lt"), imbalance_factor=10))
    >>> s.train_counts, s.manifest["counts"]["val"][:3], s.num_classes
    ([89, 68, 53, 41, 31, 24, 19, 14, 11, 8], [18, 18, 18], 10)
    >>> tmp.cleanup()
    """
    p = plan(config)
    out = as_path(config.out)
    reused = _existing(out, p.manifest)
    if reused is not None:
        log.info("reusing %s: its manifest describes the same build", out)
        return reused
    folder, records = _partial(out, p.manifest)
    written = _write_all(p, config, folder, records)
    manifest = dict(p.manifest)
    manifest.update(written)
    manifest["model_family"] = model_family(p.source.dataset, written["payload"])
    manifest["code_version"] = code_version()
    manifest["totals"] = {s: int(sum(c)) for s, c in written["counts"].items()}
    write_json(manifest, folder / "manifest.json")
    # Committed by one rename (onto an absent or empty out; on an object store, copies with the manifest last);
    # the records go only after it.
    move_folder(folder, out)
    remove_tree(records)
    log.info("wrote %s: %s", out, manifest["totals"])
    return load(out)
