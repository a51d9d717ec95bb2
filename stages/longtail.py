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
    <out>/train.parquet  <out>/val.parquet  <out>/pool.parquet
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
``available`` (per class in the official source splits), ``payload``, ``files``, ``sources``,
``source_options``, ``checksums`` (``sources``: sha256 of source files; ``splits``: sha256 of the written
files), ``selection_digest`` (sha256 of each split's sample ids), ``skipped`` (corrupt images skipped),
``code_version``, ``model_family`` ("small_cnn", "cifar_resnet", "imagenet_resnet" or "text").

Build properties: selections are made on labels-only tables (numpy), then only the chosen payload rows are
read and streamed into the files (memory bounded by one row group). The same inputs and seed give
byte-identical files and manifest. A build writes into a hidden temporary sibling folder and renames it
into place only when complete. Rebuilding into an existing folder reuses it when its manifest describes the
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
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages import ingest
from stages._io import atomic_path, sha256_file, write_json
from stages.ingest import SourceError, SourceSpec
# The reader of a split folder, which every stage uses, lives in stages.splits; these names stay here too.
from stages.splits import SPLITS, ManifestError, Splits, load  # noqa: F401

log = logging.getLogger(__name__)

PROFILES = ("exponential", "step", "lists")
SELECTIONS = ("first", "random")
ON_CORRUPT = ("fail", "skip")
FORMAT_VERSION = 1
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

    def source_spec(self) -> SourceSpec:
        names = {f.name for f in dataclasses.fields(SourceSpec)}
        return SourceSpec(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and its accepted values."""
        if not self.out:
            raise ValueError("out: the split folder to write is required")
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
        if self.row_group_rows is not None and self.row_group_rows < 1:
            raise ValueError(f"row_group_rows={self.row_group_rows!r}; accepted: None or >= 1")


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
                          **({"vocab_size": config.vocab_size, "vocab_min_count": config.vocab_min_count}
                             if src.payload["kind"] == "text" else {})},
        "checksums": {"sources": src.checksums()},
        "files": {s: f"{s}.parquet" for s in SPLITS},
    }
    return Plan(source=src, ids={s: np.sort(v) for s, v in ids.items()}, origin=origin, manifest=manifest)


# ----------------------------------------------------------------------------------------------------------
# Writing


class _SplitWriter:
    """Streams one split into a Parquet file in fixed-size row groups (output independent of read chunking)."""

    def __init__(self, path: Path, schema: pa.Schema, num_classes: int, row_group_rows: int):
        self.path, self.schema, self.rows = path, schema, row_group_rows
        self.writer = pq.ParquetWriter(path, schema, compression="snappy", use_dictionary=False)
        self.buf: list[pa.Table] = []
        self.nbuf = 0
        self.counts = np.zeros(num_classes, dtype=np.int64)

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        table = table.select(self.schema.names).cast(self.schema)
        self.counts += np.bincount(table.column("label").to_numpy(), minlength=len(self.counts))
        self.buf.append(table)
        self.nbuf += table.num_rows
        if self.nbuf >= self.rows:
            t = pa.concat_tables(self.buf)
            full = (t.num_rows // self.rows) * self.rows
            for s in range(0, full, self.rows):
                self.writer.write_table(t.slice(s, self.rows), row_group_size=self.rows)
            rest = t.slice(full)
            self.buf, self.nbuf = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> None:
        if self.buf:
            t = pa.concat_tables(self.buf)
            self.writer.write_table(t, row_group_size=max(1, t.num_rows))
        self.buf = []
        self.writer.close()


class _ImageStats:
    def __init__(self):
        self.sizes: set[tuple[int, int]] = set()
        self.channels: set[int] = set()
        self.formats: set[str] = set()

    def add(self, info: ingest.ImageInfo) -> None:
        if len(self.sizes) <= 1:  # only "one size or many" matters: keep the set tiny
            self.sizes.add(info.shape[:2])
        self.channels.add(info.shape[2])
        self.formats.add(info.format or "unknown")

    def payload(self) -> dict:
        c = 3 if 3 in self.channels or not self.channels else 1
        shape = [*next(iter(self.sizes)), c] if len(self.sizes) == 1 else None
        fmt = next(iter(self.formats)) if len(self.formats) == 1 else ("mixed" if self.formats else None)
        return {"kind": "image", "column": "image", "shape": shape, "channels": c, "format": fmt,
                "mode": "L" if c == 1 else "RGB"}


def _check_images(p: Plan, split: str, origin: str, table: pa.Table, config: LongTailConfig,
                  stats: _ImageStats, skipped: list[dict]) -> pa.Table:
    infos = ingest.inspect_images(table.column("image").to_pylist(), full_decode=config.verify_images)
    keep = np.ones(table.num_rows, dtype=bool)
    sids = table.column("sample_id").to_numpy()
    for i, info in enumerate(infos):
        if info.error is None:
            stats.add(info)
            continue
        where = p.source.describe(origin, int(sids[i]))
        if config.on_corrupt == "fail":
            raise SourceError(f"corrupt image {where} (sample_id {int(sids[i])}): {info.error}; "
                              "set on_corrupt='skip' to skip corrupt images instead of failing")
        keep[i] = False
        skipped.append({"split": split, "sample_id": int(sids[i]), "where": where, "error": info.error})
    return table if keep.all() else table.filter(pa.array(keep))


def _write_all(p: Plan, config: LongTailConfig, tmp: Path) -> dict:
    """Write every split into ``tmp``; returns the manifest updates (counts, payload, checksums, skipped)."""
    src, man = p.source, p.manifest
    K = src.num_classes
    kind = src.payload["kind"]
    payload = dict(src.payload)
    vocab_index = None
    if kind == "text":
        from stages import payload as codec

        texts = (t for batch in src.iter_batches(p.origin["train"], p.ids["train"])
                 for t in batch.column("text").to_pylist())
        vocab = codec.fit_vocab(texts, max_size=config.vocab_size, min_count=config.vocab_min_count)
        vocab_index = {tok: i + 2 for i, tok in enumerate(vocab)}
        write_json(codec.vocab_document(vocab, config.vocab_size, config.vocab_min_count), tmp / "vocab.json")
        payload = {"kind": "tokens", "column": "tokens", "text_column": "text", "shape": None,
                   "vocab": "vocab.json", "vocab_size": len(vocab) + 2, "pad_id": codec.PAD_ID,
                   "unk_id": codec.UNK_ID, "max_tokens": codec.DEFAULT_MAX_TOKENS}
    rows = config.row_group_rows or (512 if kind == "image" else 8192)
    writers: dict[str, _SplitWriter] = {}
    stats, skipped = _ImageStats(), []
    try:
        for origin in dict.fromkeys(p.origin.values()):  # each official split is read once
            targets = [s for s in SPLITS if p.origin[s] == origin]
            base = src.read_rows(origin, 0, 1).schema
            fields = list(base)
            if kind == "text":
                i = base.get_field_index("text") + 1
                fields.insert(i, pa.field("tokens", pa.list_(pa.int32())))
            encoding = {k: v for k, v in payload.items() if k != "shape" or kind == "pixels"}
            for s in targets:
                meta = {"dataset": src.dataset, "classes": src.classes, "split": s, "payload": encoding}
                schema = pa.schema(fields, metadata={b"cact": json.dumps(meta, sort_keys=True).encode()})
                writers[s] = _SplitWriter(tmp / f"{s}.parquet", schema, K, rows)
            wanted = np.unique(np.concatenate([p.ids[s] for s in targets]))
            id_sets = {s: pa.array(p.ids[s]) for s in targets}
            for batch in src.iter_batches(origin, wanted):
                if kind == "text":
                    from stages import payload as codec

                    toks = codec.encode_texts(batch.column("text").to_pylist(), vocab_index)
                    batch = batch.append_column("tokens", pa.array(toks, type=pa.list_(pa.int32())))
                for s in targets:
                    part = batch if len(targets) == 1 else batch.filter(
                        pc.is_in(batch.column("sample_id"), value_set=id_sets[s]))
                    if kind == "image":
                        part = _check_images(p, s, origin, part, config, stats, skipped)
                    writers[s].write(part)
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            try:
                w.writer.close()
            except Exception:  # noqa: BLE001 - already failing; the temporary folder is removed anyway
                pass
        raise
    if kind == "image":
        payload = stats.payload()
    if skipped:
        log.warning("skipped %d corrupt image(s) (on_corrupt='skip'); first: %s", len(skipped), skipped[0]["where"])
    counts = {s: writers[s].counts.tolist() for s in SPLITS}
    checks = {f"{s}.parquet": sha256_file(tmp / f"{s}.parquet") for s in SPLITS}
    if kind == "text":
        checks["vocab.json"] = sha256_file(tmp / "vocab.json")
    return {"counts": counts, "payload": payload, "skipped": skipped,
            "checksums": {"sources": man["checksums"]["sources"], "splits": checks}}


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
    old = load(out).manifest
    new = json.loads(_canonical(manifest))
    diff = [k for k in PLAN_KEYS if _canonical(_get(old, k)) != _canonical(_get(new, k))]
    if diff:
        raise FileExistsError(f"out={out} holds a different split build (manifest differs in: {', '.join(diff)}); "
                              "refusing to overwrite it: choose another out folder or delete it")
    for name, digest in (old.get("checksums", {}).get("splits") or {}).items():
        if sha256_file(out / name) != digest:
            raise FileExistsError(f"{out / name}: sha256 differs from {mpath}; the folder was modified: "
                                  "delete it to rebuild")
    return load(out)


def build(config: LongTailConfig) -> "Splits":
    """Build (or reuse) a long-tailed split folder and return its handle.

    >>> import tempfile, os
    >>> tmp = tempfile.TemporaryDirectory()
    >>> s = build(LongTailConfig(out=os.path.join(tmp.name, "digits-lt"), imbalance_factor=10))
    >>> s.train_counts, s.manifest["counts"]["val"][:3], s.num_classes
    ([89, 68, 53, 41, 31, 24, 19, 14, 11, 8], [18, 18, 18], 10)
    >>> tmp.cleanup()
    """
    p = plan(config)
    out = Path(config.out)
    reused = _existing(out, p.manifest)
    if reused is not None:
        log.info("reusing %s: its manifest describes the same build", out)
        return reused
    with atomic_path(out) as tmp:
        tmp.mkdir()
        written = _write_all(p, config, tmp)
        manifest = dict(p.manifest)
        manifest.update(written)
        manifest["payload"] = written["payload"]
        manifest["model_family"] = model_family(p.source.dataset, written["payload"])
        manifest["code_version"] = code_version()
        manifest["totals"] = {s: int(sum(c)) for s, c in written["counts"].items()}
        write_json(manifest, tmp / "manifest.json")
    log.info("wrote %s: %s", out, manifest["totals"])
    return load(out)
