"""Writing a planned split build as sharded Parquet: one task per shard, run as Ray Data ``map_batches`` tasks
across the cluster (:func:`run`), or in this process for small builds.

Shard ``i`` of a split holds the split's sorted sample ids ``[i * shard_rows, (i + 1) * shard_rows)`` and is
written whole by one task in fixed-size row groups, so the files depend on the plan only, never on how many
tasks ran or on which nodes. Each finished shard leaves a record (rows, per-class counts, image stats, skipped
rows, sha256) in the records folder, so a build interrupted at any point resumes with the missing shards only;
a shard whose file no longer matches its record is an error naming the file, never silently rewritten.
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stages._io import move_file, sha256_file, write_json
from stages.storage import as_path
from stages.sources import SourceError, inspect_images
from stages.splits import SPLITS

EXECUTORS = ("auto", "ray", "local")
# Default rows per shard: an image shard is a few seconds of decoding (a useful unit of work for one task);
# other payloads are cheap per row, so one shard usually holds a whole split.
SHARD_ROWS = {"image": 2048}
DEFAULT_SHARD_ROWS = 65536


def shard_file(split: str, index: int) -> str:
    """Path of shard ``index`` of ``split`` inside the split folder.

    >>> shard_file("train", 3)
    'train/part-00003.parquet'
    """
    return f"{split}/part-{index:05d}.parquet"


class _RowGroupWriter:
    """Streams tables into one Parquet file in fixed-size row groups (output independent of read chunking)."""

    def __init__(self, path: Path, schema: pa.Schema, row_group_rows: int):
        self.schema, self.rows = schema, row_group_rows
        self.writer = pq.ParquetWriter(path, schema, compression="snappy", use_dictionary=False)
        self.buf: list[pa.Table] = []
        self.nbuf = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.buf.append(table.select(self.schema.names).cast(self.schema))
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


class ImageStats:
    """What the written images share (one size or many, channels, format): the manifest's image payload."""

    def __init__(self):
        self.sizes: set[tuple[int, int]] = set()
        self.channels: set[int] = set()
        self.formats: set[str] = set()

    def _add_size(self, h: int, w: int) -> None:
        if len(self.sizes) <= 1:  # only "one size or many" matters: keep the set tiny
            self.sizes.add((int(h), int(w)))

    def add(self, shape, fmt: str | None) -> None:
        self._add_size(shape[0], shape[1])
        self.channels.add(int(shape[2]))
        self.formats.add(fmt or "unknown")

    def merge(self, record: dict) -> None:
        """Add another shard's :meth:`record`."""
        for h, w in record["sizes"]:
            self._add_size(h, w)
        self.channels.update(record["channels"])
        self.formats.update(record["formats"])

    def record(self) -> dict:
        return {"sizes": sorted(map(list, self.sizes)), "channels": sorted(self.channels),
                "formats": sorted(self.formats)}

    def payload(self) -> dict:
        c = 3 if 3 in self.channels or not self.channels else 1
        shape = [*next(iter(self.sizes)), c] if len(self.sizes) == 1 else None
        fmt = next(iter(self.formats)) if len(self.formats) == 1 else ("mixed" if self.formats else None)
        return {"kind": "image", "column": "image", "shape": shape, "channels": c, "format": fmt,
                "mode": "L" if c == 1 else "RGB"}


class ShardWriter:
    """Reads, checks, encodes and writes one shard of a planned build (picklable: Ray Data tasks run it).

    ``folder`` receives the split folders; ``records`` the shard records and the files being written.
    """

    def __init__(self, source, ids: dict[str, np.ndarray], origin: dict[str, str], schemas: dict[str, pa.Schema],
                 folder: Path, records: Path, shard_rows: int, row_group_rows: int, on_corrupt: str = "fail",
                 verify_images: bool = True, vocab_index: dict[str, int] | None = None):
        self.source, self.ids, self.origin, self.schemas = source, ids, origin, schemas
        self.folder, self.records = str(folder), str(records)
        self.shard_rows, self.row_group_rows = int(shard_rows), int(row_group_rows)
        self.on_corrupt, self.verify_images, self.vocab_index = on_corrupt, verify_images, vocab_index

    def num_shards(self, split: str) -> int:
        return max(1, math.ceil(len(self.ids[split]) / self.shard_rows))  # an empty split still gets its file

    def _record_path(self, split: str, index: int) -> Path:
        return as_path(self.records, absolute=False) / f"{split}-{index:05d}.json"

    def finished(self, split: str, index: int) -> dict | None:
        """The record of a shard written earlier and still intact; None if it was not finished."""
        rpath = self._record_path(split, index)
        if not rpath.is_file():
            return None
        try:
            record = json.loads(rpath.read_text())
        except ValueError as e:
            raise FileExistsError(f"{rpath}: unreadable shard record ({e}); the build folder was modified: "
                                  f"delete {self.records} and {self.folder} to rebuild from scratch") from e
        path = as_path(self.folder, absolute=False) / record["file"]
        if not path.is_file() or sha256_file(path) != record["sha256"]:
            what = "is missing" if not path.is_file() else "changed since it was written (sha256 differs)"
            raise FileExistsError(f"{path}: shard {what}, per its record {rpath}; refusing to overwrite it: "
                                  f"delete {self.records} and {self.folder} to rebuild from scratch")
        return record

    def write(self, split: str, index: int) -> dict:
        """Write shard ``index`` of ``split`` (to a temporary file, then moved into place) and its record."""
        final = as_path(self.folder, absolute=False) / shard_file(split, index)
        # written under the records folder (removed on commit), or in a local folder when the split is at a URI
        staging = Path(self.records) if isinstance(final, Path) else Path(tempfile.mkdtemp(prefix="cact-shard-"))
        tmp = staging / f"{split}-{index:05d}.{os.getpid()}.parquet.tmp"
        try:
            counts, skipped, stats = self._write_rows(split, index, tmp)
            # hashed and sized here, not read back from its destination (a download, on an object store)
            digest, size = sha256_file(tmp), tmp.stat().st_size
            move_file(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
            if staging != Path(self.records):
                staging.rmdir()
        record = {"split": split, "index": index, "file": shard_file(split, index), "sha256": digest,
                  "bytes": size, "rows": int(counts.sum()), "counts": counts.tolist(),
                  "skipped": skipped, **stats.record()}
        write_json(record, self._record_path(split, index))
        return record

    def _write_rows(self, split: str, index: int, tmp: Path) -> tuple[np.ndarray, list[dict], ImageStats]:
        origin, schema = self.origin[split], self.schemas[split]
        ids = self.ids[split][index * self.shard_rows:(index + 1) * self.shard_rows]
        counts = np.zeros(len(self.source.classes), dtype=np.int64)
        stats, skipped = ImageStats(), []
        kind = self.source.payload["kind"]
        writer = _RowGroupWriter(tmp, schema, self.row_group_rows)
        try:
            for batch in (self.source.iter_batches(origin, ids) if len(ids) else ()):
                if kind == "text":
                    from stages import payload as codec

                    toks = codec.encode_texts(batch.column("text").to_pylist(), self.vocab_index)
                    batch = batch.append_column("tokens", pa.array(toks, type=pa.list_(pa.int32())))
                if kind == "image":
                    batch = self._check_images(split, origin, batch, stats, skipped)
                counts += np.bincount(batch.column("label").to_numpy(), minlength=len(counts))
                writer.write(batch)
            writer.close()
        except BaseException:
            writer.writer.close()
            raise
        return counts, skipped, stats

    def _check_images(self, split: str, origin: str, table: pa.Table, stats: ImageStats,
                      skipped: list[dict]) -> pa.Table:
        infos = inspect_images(table.column("image").to_pylist(), full_decode=self.verify_images)
        keep = np.ones(table.num_rows, dtype=bool)
        sids = table.column("sample_id").to_numpy()
        for i, info in enumerate(infos):
            if info.error is None:
                stats.add(info.shape, info.format)
                continue
            where = self.source.describe(origin, int(sids[i]))
            if self.on_corrupt == "fail":
                raise SourceError(f"corrupt image {where} (sample_id {int(sids[i])}): {info.error}; "
                                  "set on_corrupt='skip' to skip corrupt images instead of failing")
            keep[i] = False
            skipped.append({"split": split, "sample_id": int(sids[i]), "where": where, "error": info.error})
        return table if keep.all() else table.filter(pa.array(keep))


def _write_shards(writer: ShardWriter):
    def write_shards(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data task: (split, index) rows in, their records (JSON) out."""
        import ray

        node = ray.get_runtime_context().get_node_id()
        records = [{**writer.write(str(s), int(i)), "node": node} for s, i in zip(batch["split"], batch["index"])]
        return {"record": np.array([json.dumps(r) for r in records], dtype=object)}
    return write_shards


def run(writer: ShardWriter, executor: str = "auto", max_cpus: int | None = None) -> list[dict]:
    """Write every shard without an intact record; return all shards' records in (split, index) order.

    ``executor``: ``"ray"`` (Ray Data tasks of one CPU, at most ``max_cpus`` at a time; all the cluster's CPUs
    when None), ``"local"`` (this process), ``"auto"``: Ray Data when Ray is already running here (a pipeline,
    a cluster job) and some split has more than one shard to write; this process otherwise (a single shard per
    split costs less than a Ray Data pass, and a library call does not start a cluster just for a build).
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor={executor!r}; accepted: {', '.join(EXECUTORS)}")
    done: dict[tuple[str, int], dict] = {}
    todo: list[tuple[str, int]] = []
    for split in SPLITS:
        for i in range(writer.num_shards(split)):
            record = writer.finished(split, i)
            if record is None:
                todo.append((split, i))
            else:
                done[(split, i)] = record
    resumed = {s: sum(1 for (t, _) in done if t == s) for s in SPLITS}
    if executor == "auto":
        ray = sys.modules.get("ray")
        running = ray is not None and ray.is_initialized()
        executor = "ray" if running and len(todo) > len(SPLITS) else "local"
    if todo and executor == "ray":
        import ray

        ds = ray.data.from_items([{"split": s, "index": i} for s, i in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(_write_shards(writer), batch_size=1, batch_format="numpy", num_cpus=1,
                            compute=ray.data.TaskPoolStrategy(size=max_cpus))
        for row in ds.iter_rows():
            record = json.loads(row["record"])
            done[(record["split"], record["index"])] = record
    elif todo:
        from tqdm import tqdm

        for split, i in tqdm(todo, desc="split build (shards)", unit="shard", disable=None):
            done[(split, i)] = writer.write(split, i)
    records = [done[(s, i)] for s in SPLITS for i in range(writer.num_shards(s))]
    for split in SPLITS:
        mine = [r for r in records if r["split"] == split]
        size = sum(r["bytes"] for r in mine) / 2**20
        nodes = len({r["node"] for r in mine if "node" in r})
        where = f" on {nodes} node(s)" if nodes else ""
        print(f"split build: {split}: {sum(r['rows'] for r in mine):,} rows in {len(mine)} shard(s), "
              f"{size:.1f} MiB ({resumed[split]} resumed, {len(mine) - resumed[split]} written by {executor}{where})",
              file=sys.stderr, flush=True)
    return records
