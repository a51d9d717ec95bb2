"""20 Newsgroups "bydate" (the tarball or its unpacked folder): raw latin-1 text, one row per message."""
from __future__ import annotations

import hashlib
import os
import re
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa

from stages._io import sha256_file
from stages.sources.base import Source, SourceError, SourceSpec, _require_dir


def strip_newsgroup_header(text: str) -> str:
    """Drop the header block (everything before the first blank line), as scikit-learn does.

    >>> strip_newsgroup_header("From: a\\nSubject: b\\n\\nbody")
    'body'
    """
    _before, _blank, after = text.partition("\n\n")
    return after


class NewsgroupsSource(Source):
    """20 Newsgroups "bydate": ``20news-bydate-{train,test}/<group>/<doc id>``, raw latin-1 text.

    ``data_root`` is the tarball ``20news-bydate.tar.gz``, a folder holding it, or the unpacked folder. The
    tarball is streamed member by member (nothing is extracted). Order: groups sorted, then documents
    sorted by file name (as scikit-learn's ``load_files``); classes are the sorted group names.
    """

    dataset = "newsgroups"
    splits = ("train", "test")

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        root = Path(spec.data_root)
        if root.is_dir() and (root / "20news-bydate-train").is_dir():
            self._tar, self._dir = None, root
        else:
            tar = root / "20news-bydate.tar.gz" if root.is_dir() else root
            if not tar.is_file():
                raise FileNotFoundError(2, f"20 Newsgroups not found: neither {root / '20news-bydate-train'} "
                                           f"nor {tar}", str(tar))
            self._tar, self._dir = tar, None
        self.payload = {"kind": "text", "column": "text"}
        self._cache: dict = {}
        self._docs: dict[str, tuple[list[str], list[str]]] = {}
        self._read_all()

    def _read_all(self) -> None:
        docs: dict[str, dict[str, bytes]] = {"train": {}, "test": {}}
        pattern = re.compile(r"(?:\./)?20news-bydate-(train|test)/([^/]+)/([^/]+)$")
        if self._tar is not None:
            try:
                with tarfile.open(self._tar, "r:gz") as tf:
                    for m in tf:
                        mt = pattern.match(m.name)
                        if mt and m.isfile():
                            docs[mt.group(1)][f"{mt.group(2)}/{mt.group(3)}"] = tf.extractfile(m).read()
            except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
                raise SourceError(f"{self._tar}: unreadable or truncated tarball ({e})") from e
        else:
            for split in docs:
                base = self._dir / f"20news-bydate-{split}"
                _require_dir(base, f"20 Newsgroups {split} folder")
                for g in os.scandir(base):
                    if g.is_dir():
                        for f in os.scandir(g.path):
                            if f.is_file():
                                docs[split][f"{g.name}/{f.name}"] = Path(f.path).read_bytes()
        for split, d in docs.items():
            if not d:
                raise SourceError(f"{self._tar or self._dir}: no documents under 20news-bydate-{split}/")
        self.classes = sorted({k.split("/")[0] for d in docs.values() for k in d})
        for split, d in docs.items():
            known = set(self.classes)
            keys = sorted(d, key=lambda k: tuple(k.split("/")))
            texts = [d[k].decode("latin-1") for k in keys]
            if self.spec.strip_headers:
                texts = [strip_newsgroup_header(t) for t in texts]
            assert all(k.split("/")[0] in known for k in keys)
            self._docs[split] = (keys, texts)
        index = {c: k for k, c in enumerate(self.classes)}
        n_train = len(self._docs["train"][0])
        for split, (keys, _) in self._docs.items():
            off = 0 if split == "train" else n_train
            self._set_labels(split, np.arange(len(keys)) + off, [index[k.split("/")[0]] for k in keys],
                             str(self._tar or self._dir))

    def _load_labels(self, split):
        pass

    def _read(self, split, rows):
        keys, texts = self._docs[split]
        return {"text": pa.array([texts[int(r)] for r in rows], type=pa.string()),
                "path": pa.array([f"20news-bydate-{split}/{keys[int(r)]}" for r in rows], type=pa.string())}

    def sources(self):
        return [str((self._tar or self._dir).resolve())]

    def checksums(self):
        if self._tar is not None:
            return {str(self._tar.resolve()): sha256_file(self._tar)}
        h = hashlib.sha256()
        for split, (keys, _) in self._docs.items():
            for k in keys:
                p = self._dir / f"20news-bydate-{split}" / k
                h.update(f"{split}/{k}\t{sha256_file(p)}\n".encode())
        return {f"{self._dir.resolve()} [tree: relative path + sha256]": h.hexdigest()}
