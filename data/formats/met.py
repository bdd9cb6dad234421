"""The Met artworks dataset (nikosips/met): ground_truth/MET_database.json ([{"id", "path"}]: exhibit
photos; `mini=True` reads mini_MET_database.json instead), ground_truth/testset.json and valset.json
([{"path", "MET_id"?}]: visitor photos; those without MET_id are distractors: other art or no art).
Paths are relative to the root (or root/images). Both query sets are ingested as queries, told apart by
`source` (met:test:<path>, met:val:<path>): evaluation reports the test set and tunes the official k-NN
classifier on the validation set, as the official `knn_eval.py --autotune` does."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from data.config import NO_LABEL
from data.errors import DataFormatError
from data.formats.common import Source
from data.manifest import check_unique_ids, safe_id


def _load(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataFormatError("file not found", where=str(path))
    try:
        items = json.loads(path.read_text())
    except Exception as e:
        raise DataFormatError(f"not valid JSON ({e})", where=str(path)) from None
    if not isinstance(items, list):
        raise DataFormatError("expected a JSON list of {path, id} records", where=str(path))
    for i, it in enumerate(items):
        if not isinstance(it, dict) or not isinstance(it.get("path"), str):
            raise DataFormatError("record has no 'path'", where=f"{path}, item {i}")
        if ".." in Path(it["path"]).parts or Path(it["path"]).is_absolute():
            raise DataFormatError(f"path {it['path']!r} escapes the dataset folder", where=f"{path}, item {i}")
    return items


def read(root: Path, mini: bool = False, **_) -> Source:
    root = Path(root)
    gt = root / "ground_truth"
    images = root / "images" if (root / "images").is_dir() else root
    rows = []
    db = gt / ("mini_MET_database.json" if mini else "MET_database.json")
    for i, it in enumerate(_load(db)):
        label = it.get("id", it.get("MET_id"))
        if label is None:
            raise DataFormatError("exhibit record has no 'id'", where=f"{db}, item {i}")
        rows.append({"image_id": safe_id(it["path"].rsplit(".", 1)[0].replace("/", "-")), "label": str(label),
                     "split": "index", "source": f"met:db:{it['path']}", "src": str(images / it["path"])})
    sets = [(part, gt / f"{part}set.json") for part in ("test", "val") if (gt / f"{part}set.json").exists()]
    if not sets:
        raise DataFormatError("no testset.json or valset.json", where=str(gt))
    for part, qfile in sets:
        for it in _load(qfile):
            label = it.get("MET_id", it.get("id"))
            rows.append({"image_id": safe_id(it["path"].rsplit(".", 1)[0].replace("/", "-")),
                         "label": NO_LABEL if label is None else str(label), "split": "query",
                         "source": f"met:{part}:{it['path']}", "src": str(images / it["path"])})
    df = pd.DataFrame(rows).assign(domain="artwork")
    check_unique_ids(df, str(gt))
    return Source(df, "met", "met")
