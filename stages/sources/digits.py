"""scikit-learn's bundled 8x8 digits (no files needed): the embedded default source."""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from pathlib import Path

import numpy as np

from stages.sources.base import Source, SourceSpec, _pixels_column, _pixels_payload


def _digits_file() -> Path:
    """scikit-learn's ``datasets/data/digits.csv.gz``, found without importing scikit-learn (3.5 s here)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the digits source reads scikit-learn's bundled digits: pip install scikit-learn")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"


class DigitsSource(Source):
    """scikit-learn's bundled 8x8 digits (1797 images, values 0..16 rescaled to uint8 0..255).

    Digits has no official test split, so a fixed deterministic rule makes one: within each class, in
    ``load_digits`` order, rows with an even within-class rank form the ``train`` part and odd ranks the
    ``test`` part (a stratified 50/50 split). ``sample_id`` is the row index in ``load_digits``.

    >>> src = DigitsSource(SourceSpec())
    >>> src.labels("train").num_rows, src.labels("test").num_rows
    (901, 896)
    """

    needs_data_root = False

    dataset = "digits"
    splits = ("train", "test")

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        data = np.loadtxt(_digits_file(), delimiter=",")  # what load_digits reads: 64 pixels, then the label
        self.classes = [str(k) for k in range(10)]
        # 0..16 -> 0..255, rounded: the payload is uint8 like every other pixel source.
        self._pix = np.rint(data[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)[..., None]
        y = data[:, -1].astype(np.int64)
        rank = np.zeros(len(y), dtype=np.int64)
        for k in range(len(self.classes)):
            idx = np.flatnonzero(y == k)
            rank[idx] = np.arange(len(idx))
        parts = {"train": np.flatnonzero(rank % 2 == 0), "test": np.flatnonzero(rank % 2 == 1)}
        for split, idx in parts.items():
            self._set_labels(split, idx, y[idx], "sklearn load_digits target")
        self.payload = _pixels_payload(self._pix.shape[1:])

    def _load_labels(self, split):
        pass

    def _read(self, split, rows):
        return {"pixels": _pixels_column(self._pix[self._ids[split][rows]])}

    def sources(self):
        return [f"sklearn.datasets.load_digits (scikit-learn {importlib.metadata.version('scikit-learn')})"]

    def checksums(self):
        return {"sklearn.datasets.load_digits": hashlib.sha256(self._pix.tobytes()).hexdigest()}
