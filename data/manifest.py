"""The dataset manifest: one Parquet table per dataset version, the contract every reader produces.

Columns:
  image_id  str   unique, safe as a file name ([A-Za-z0-9][A-Za-z0-9._-]*, no "..")
  path      str   image path relative to the dataset folder
  label     str   instance label; NO_LABEL ("__none__") for distractors / non-landmark images
  split     str   train | val | index | query
  domain    str   landmark | artwork | product | other
  bbox      list[float] | null   query box [x0, y0, x1, y1] in pixels (Revisited Oxford/Paris)
  source    str   where the image came from (format and original file)
  gt_easy, gt_hard, gt_junk  list[str] | null   explicit ground truth of a query (image_ids of the index)
  gt_labels list[str] | null   recognition ground truth (GLDv2: the query's landmark ids, may be empty)

The dataset folder also holds `dataset.json`: name, format, protocol ("labels", "leave_one_out",
"revisited", "gldv2"), counts.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data.config import DOMAINS, SPLITS
from data.errors import DataFormatError

MANIFEST = "manifest.parquet"
INFO = "dataset.json"
COLUMNS = ["image_id", "path", "label", "split", "domain", "bbox", "source",
           "gt_easy", "gt_hard", "gt_junk", "gt_labels"]
LIST_COLUMNS = ["gt_easy", "gt_hard", "gt_junk", "gt_labels"]
PROTOCOLS = ("labels", "leave_one_out", "revisited", "gldv2", "met", "sop")

_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("path", pa.string()), ("label", pa.string()),
    ("split", pa.string()), ("domain", pa.string()), ("bbox", pa.list_(pa.float64())),
    ("source", pa.string()),
    *[(c, pa.list_(pa.string())) for c in LIST_COLUMNS],
])
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def check_image_id(image_id, where: str | None, what: str = "image id") -> str:
    """Return the id if it is safe as a file name and in URLs; raise DataFormatError naming `what` and `where`."""
    if not isinstance(image_id, str) or not _SAFE_ID.fullmatch(image_id) or ".." in image_id:
        raise DataFormatError(
            f"unsafe {what} {image_id!r}: it must match [A-Za-z0-9][A-Za-z0-9._-]* "
            "(no slashes, no '..', at most 200 characters)", where=where)
    return image_id


def safe_id(text: str) -> str:
    """Turn a file or folder name into a safe id fragment (used by formats that derive ids from paths)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")
    return re.sub(r"\.{2,}", ".", s) or "x"


def require_columns(df: pd.DataFrame, required: list[str], where: str) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataFormatError(f"missing column(s) {missing}; found {list(df.columns)}", where=where)


def check_unique_ids(df: pd.DataFrame, where: str, column: str = "image_id") -> None:
    dup = df[column][df[column].duplicated(keep=False)]
    if len(dup):
        rows = ", ".join(f"row {i + 2}: {v!r}" for i, v in list(dup.items())[:5])
        raise DataFormatError(f"{dup.nunique()} duplicate id(s) in column {column!r} ({rows})", where=where)


def check_labels(df: pd.DataFrame, where: str, column: str = "label") -> None:
    bad = df[column].isna() | (df[column].astype(str).str.strip() == "") | (df[column].astype(str).str.lower() == "nan")
    if bad.any():
        rows = ", ".join(f"row {i + 2}" for i in list(df.index[bad])[:5])
        raise DataFormatError(f"{int(bad.sum())} missing/NaN label(s) in column {column!r} ({rows})", where=where)


def normalize(df: pd.DataFrame, where: str) -> pd.DataFrame:
    """Complete optional columns, check ids/splits/domains, and return the columns in manifest order."""
    df = df.copy()
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = None
    require_columns(df, ["image_id", "path", "label", "split", "domain"], where)
    for i, v in df["image_id"].items():
        check_image_id(v, f"{where}, row {i + 2}")
    check_unique_ids(df, where)
    check_labels(df, where)
    for col, allowed in (("split", SPLITS), ("domain", DOMAINS)):
        bad = ~df[col].isin(allowed)
        if bad.any():
            raise DataFormatError(f"{col} {df[col][bad].iloc[0]!r} is not one of {list(allowed)}", where=where)
    df["label"] = df["label"].astype(str)
    return df[COLUMNS].reset_index(drop=True)


def write(df: pd.DataFrame, folder: Path, info: dict) -> None:
    """Write manifest.parquet and dataset.json into `folder` (deterministic bytes for equal input)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = df[COLUMNS].astype(object).where(df[COLUMNS].notna(), None)
    table = pa.Table.from_pandas(rows, schema=_SCHEMA, preserve_index=False).replace_schema_metadata(None)
    pq.write_table(table, folder / MANIFEST, compression="zstd")
    counts = df.groupby(["split", "domain"]).size()
    info = {**info, "images": int(len(df)), "labels": int(df["label"].nunique()),
            "counts": {f"{s}/{d}": int(n) for (s, d), n in counts.items()}}
    (folder / INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def read(folder: Path) -> pd.DataFrame:
    df = pq.read_table(Path(folder) / MANIFEST).to_pandas()
    for c in LIST_COLUMNS + ["bbox"]:
        df[c] = df[c].map(lambda v: None if v is None else list(v))
    return df


def read_info(folder: Path) -> dict:
    return json.loads((Path(folder) / INFO).read_text())


def counts(df: pd.DataFrame) -> dict[str, int]:
    """Images per split and per domain, e.g. {'split/query': 10, 'domain/landmark': 40}."""
    out = {f"split/{k}": int(v) for k, v in df["split"].value_counts().sort_index().items()}
    out.update({f"domain/{k}": int(v) for k, v in df["domain"].value_counts().sort_index().items()})
    return out


def list_or_none(values) -> list[str] | None:
    if values is None or (isinstance(values, float) and np.isnan(values)):
        return None
    return [str(v) for v in values]
