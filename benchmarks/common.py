"""Shared set-up for the model benchmarks: the generated `small` dataset and its features (cached)."""
from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import numpy as np

from data import manifest, synthetic
from data.config import NO_LABEL

CACHE = Path(os.environ.get("ILR_BENCH_CACHE", Path(tempfile.gettempdir()) / "ilr-bench"))


def small_dataset(size: str = "small", seed: int = 0) -> tuple[Path, "manifest.pd.DataFrame"]:
    folder = CACHE / f"synthetic-{size}-{seed}"
    if not (folder / manifest.MANIFEST).exists():
        synthetic.generate(folder, size, seed=seed, workers=2)
    return folder, manifest.read(folder)


def split(df):
    index = df[df["split"] == "index"].reset_index(drop=True)
    queries = df[df["split"] == "query"].reset_index(drop=True)
    labels = index["label"].to_numpy()
    positives = [np.flatnonzero((labels == lab) & (labels != NO_LABEL)) for lab in queries["label"]]
    return index, queries, positives


def features(extractor, folder: Path, df, key: str):
    """Extract (index, query) features once per key; cached as a pickle of numpy arrays."""
    path = CACHE / f"features-{key}.pkl"
    if path.exists():
        with open(path, "rb") as f:
            return pickle.load(f)
    index, queries, _ = split(df)
    out = (extractor.extract([folder / p for p in index["path"]]),
           extractor.extract([folder / p for p in queries["path"]]))
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(out, f)
    return out
