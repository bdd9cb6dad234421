"""Shared set-up for the model benchmarks: the generated `small` dataset and its features (cached)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from data import manifest, synthetic
from data.config import NO_LABEL

def _cache() -> Path:
    """ILR_BENCH_CACHE, else $ILR_HOME/bench-cache: private to this user (never a shared, predictable /tmp
    folder another user could plant files in)."""
    from data.config import ilr_home

    path = Path(os.environ["ILR_BENCH_CACHE"]) if os.environ.get("ILR_BENCH_CACHE") else ilr_home() / "bench-cache"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


CACHE = _cache()


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


def save_features(path: Path, feats: list) -> None:
    """Features as plain arrays in an .npz (loaded without pickle: a cache file cannot run code)."""
    counts = np.array([len(f.keypoints) for f in feats], np.int64)
    cat = lambda name, shape: np.concatenate([getattr(f, name) for f in feats]) if feats else np.zeros(shape)  # noqa: E731
    np.savez(path, counts=counts, sizes=np.array([f.size for f in feats], np.int64).reshape(-1, 2),
             global_desc=np.stack([f.global_desc for f in feats]) if feats else np.zeros((0, 1)),
             keypoints=cat("keypoints", (0, 2)), descriptors=cat("descriptors", (0, 1)),
             scores=cat("scores", (0,)), scales=cat("scales", (0,)))


def load_features(path: Path) -> list:
    from models.features import Features

    z = np.load(path, allow_pickle=False)
    ends = np.cumsum(z["counts"])
    starts = ends - z["counts"]
    return [Features(z["global_desc"][i], z["keypoints"][a:b], z["descriptors"][a:b], z["scores"][a:b],
                     z["scales"][a:b], tuple(int(v) for v in z["sizes"][i])) for i, (a, b) in enumerate(zip(starts, ends))]


def features(extractor, folder: Path, df, key: str):
    """Extract (index, query) features once per key; cached as .npz files (no pickle)."""
    paths = CACHE / f"features-{key}-index.npz", CACHE / f"features-{key}-query.npz"
    if all(p.exists() for p in paths):
        return tuple(load_features(p) for p in paths)
    index, queries, _ = split(df)
    out = (extractor.extract([folder / p for p in index["path"]]),
           extractor.extract([folder / p for p in queries["path"]]))
    for p, feats in zip(paths, out):
        save_features(p, feats)
    return out
