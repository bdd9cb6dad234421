"""Stanford Online Products: Ebay_train.txt / Ebay_test.txt ("image_id class_id super_class_id path").
Train classes -> train/val; test classes -> index, evaluated leave-one-out: every test image queries all
the others, Recall@1/10/100/1000 (Song et al., CVPR 2016) as the headline, mAP beside it."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from data.errors import DataFormatError
from data.formats.common import Source, hash_split, read_csv
from data.manifest import check_labels, check_unique_ids


def read(root: Path, val_fraction: float = 0.1, **_) -> Source:
    root = Path(root)
    parts = []
    for name, split in (("Ebay_train.txt", "train"), ("Ebay_test.txt", "index")):
        f = root / name
        df = read_csv(f, ["image_id", "class_id", "path"], sep=r"\s+", engine="python")
        check_labels(df, str(f), "class_id")
        check_unique_ids(df, str(f))
        bad = df["path"].map(lambda p: ".." in Path(p).parts or Path(p).is_absolute())
        if bad.any():
            i = int(bad.idxmax())
            raise DataFormatError(f"path {df['path'][i]!r} escapes the dataset folder", where=f"{f}, row {i + 2}")
        df = df.assign(image_id=f"sop-{split}-" + df["image_id"], label=df["class_id"], split=split,
                       source="sop:" + df["path"], src=[str(root / p) for p in df["path"]])
        if split == "train":
            df["split"] = hash_split(df["image_id"], df["label"], val_fraction)
        parts.append(df)
    rows = pd.concat(parts, ignore_index=True).assign(domain="product")
    return Source(rows[["image_id", "label", "split", "domain", "source", "src"]], "sop", "sop")
