"""The Met artworks dataset: ground_truth/MET_database.json ([{"id", "path"}]: exhibit photos) and
ground_truth/testset.json (or valset.json) ([{"path", "MET_id"?}]: visitor photos; those without MET_id
are distractors: other art or no art). Paths are relative to the root (or root/images)."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from data.config import NO_LABEL
from data.errors import DataFormatError
from data.formats import Source
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


def read(root: Path, **_) -> Source:
    root = Path(root)
    gt = root / "ground_truth"
    images = root / "images" if (root / "images").is_dir() else root
    rows = []
    for i, it in enumerate(_load(gt / "MET_database.json")):
        label = it.get("id", it.get("MET_id"))
        if label is None:
            raise DataFormatError("exhibit record has no 'id'", where=f"{gt / 'MET_database.json'}, item {i}")
        rows.append({"image_id": safe_id(it["path"].rsplit(".", 1)[0].replace("/", "-")), "label": str(label),
                     "split": "index", "source": f"met:{it['path']}", "src": str(images / it["path"])})
    qfile = gt / "testset.json" if (gt / "testset.json").exists() else gt / "valset.json"
    for it in _load(qfile):
        label = it.get("MET_id", it.get("id"))
        rows.append({"image_id": safe_id(it["path"].rsplit(".", 1)[0].replace("/", "-")),
                     "label": NO_LABEL if label is None else str(label), "split": "query",
                     "source": f"met:{it['path']}", "src": str(images / it["path"])})
    df = pd.DataFrame(rows).assign(domain="artwork")
    check_unique_ids(df, str(gt))
    return Source(df, "labels", "met")
