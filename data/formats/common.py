"""What every reader shares: the Source it returns, CSV reading with clear errors, the hash split."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from data.errors import DataFormatError


@dataclass
class Source:
    rows: pd.DataFrame          # manifest columns + `src` (absolute image path)
    protocol: str               # see data.manifest.PROTOCOLS
    format: str


def read_csv(path: Path, required: list[str], **kw) -> pd.DataFrame:
    """Read a CSV as strings, with a clear error when it is missing or lacks columns."""
    from data.manifest import require_columns

    if not path.is_file():
        raise DataFormatError("file not found", where=str(path))
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], **kw)
    except Exception as e:
        raise DataFormatError(f"not a readable CSV ({e})", where=str(path)) from None
    df.columns = [c.strip() for c in df.columns]
    require_columns(df, required, str(path))
    return df


def hash_split(ids: pd.Series, labels: pd.Series, val_fraction: float) -> pd.Series:
    """Deterministic train/val split by id hash, keeping >= 2 train images in every class."""
    h = pd.util.hash_pandas_object(ids, index=False).to_numpy() % 1000
    val = h < int(val_fraction * 1000)
    split = pd.Series(np.where(val, "val", "train"), index=ids.index)
    train_left = (split == "train").groupby(labels).transform("sum")
    split[(split == "val") & (train_left < 2)] = "train"
    # a class with a single val image and < 2 train images stays entirely in train
    return split
