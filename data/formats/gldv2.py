"""Google Landmarks Dataset v2 (v2.1 ground truth).

Files in SOURCE, as released (cvdfoundation/google-landmark): train.csv (id,url,landmark_id), optional
train_clean.csv (landmark_id,images), index.csv (id), test.csv (id), retrieval_solution_v2.1.csv
(id,images,Usage), recognition_solution_v2.1.csv (id,landmarks,Usage). Images at
SOURCE/{train,index,test}/a/b/c/<id>.jpg (or SOURCE/a/b/c/<id>.jpg).

Id spaces: `label` holds *train* landmark ids only (train images, and a test query's first landmark;
`gt_labels` has all of them). Index images have no label: the release gives index images no landmark
ids, and the ones used elsewhere are from another id space (so no number can mean two landmarks).
Retrieval ground truth is `gt_easy` (index image ids), recognition ground truth `gt_labels` (train
landmark ids; empty for a non-landmark query). Usage is Public, Private or Ignored (anything else is
refused, as the official reader does); Ignored rows are dropped and a query's Usage is kept in its
`source` (gldv2:test:Public / gldv2:test:Private) so that evaluation reports the two separately.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from data.config import NO_LABEL
from data.errors import DataFormatError
from data.formats.common import Source, hash_split, read_csv
from data.manifest import check_image_id, check_labels, check_unique_ids


def image_path(root: Path, part: str, image_id: str) -> Path:
    rel = Path(image_id[0], image_id[1], image_id[2], f"{image_id}.jpg")
    nested = root / part / rel
    return nested if nested.exists() or not (root / rel).exists() else root / rel


def _ids(df: pd.DataFrame, file: Path, column: str = "id") -> pd.DataFrame:
    check_labels(df, str(file), column)  # empty ids are as bad as empty labels
    for i, v in df[column].items():
        check_image_id(v, f"{file}, row {i + 2}")
        if len(v) < 3:
            raise DataFormatError(f"id {v!r} is too short for the a/b/c/<id>.jpg layout", f"{file}, row {i + 2}")
    check_unique_ids(df, str(file), column)
    return df


USAGES = ("Public", "Private", "Ignored")


def _solution(path: Path, column: str) -> pd.DataFrame:
    df = _ids(read_csv(path, ["id", column, "Usage"]), path)
    df["Usage"] = df["Usage"].fillna("").str.strip()
    bad = ~df["Usage"].isin(USAGES)
    if bad.any():
        i = int(bad.to_numpy().argmax())
        raise DataFormatError(f"Usage {df['Usage'].iloc[i]!r} is not one of {', '.join(USAGES)}",
                              where=f"{path}, row {df.index[i] + 2}")
    return df[df["Usage"] != "Ignored"].copy()


def read(root: Path, val_fraction: float = 0.1, **_) -> Source:
    root = Path(root)
    if not root.is_dir():
        raise DataFormatError("folder not found", where=str(root))
    train = _ids(read_csv(root / "train.csv", ["id", "landmark_id"]), root / "train.csv")
    check_labels(train, str(root / "train.csv"), "landmark_id")
    if (root / "train_clean.csv").exists():
        clean = read_csv(root / "train_clean.csv", ["landmark_id", "images"])
        keep = {i for imgs in clean["images"].fillna("") for i in imgs.split()}
        train = train[train["id"].isin(keep)]
    train = train.assign(label=train["landmark_id"], domain="landmark", source="gldv2:train",
                         src=[str(image_path(root, "train", i)) for i in train["id"]])
    train["split"] = hash_split(train["id"], train["label"], val_fraction)

    index = _ids(read_csv(root / "index.csv", ["id"]), root / "index.csv")
    index = index.assign(label=NO_LABEL, split="index",
                         domain="landmark", source="gldv2:index",
                         src=[str(image_path(root, "index", i)) for i in index["id"]])

    test = _ids(read_csv(root / "test.csv", ["id"]), root / "test.csv")
    ret = _solution(root / "retrieval_solution_v2.1.csv", "images")
    rec = _solution(root / "recognition_solution_v2.1.csv", "landmarks")
    index_ids = set(index["id"])
    gt_images = {}
    for i, (qid, imgs) in enumerate(zip(ret["id"], ret["images"].fillna(""))):
        ids = imgs.split() if imgs.strip() != "None" else []
        unknown = [x for x in ids if x not in index_ids]
        if unknown:
            raise DataFormatError(f"retrieval ground truth names {unknown[0]!r}, which is not in index.csv",
                                  where=f"{root / 'retrieval_solution_v2.1.csv'}, id {qid}")
        gt_images[qid] = ids
    gt_landmarks = {q: lm.split() for q, lm in zip(rec["id"], rec["landmarks"].fillna(""))}
    usage = dict(zip(ret["id"], ret["Usage"]))
    for q, u in zip(rec["id"], rec["Usage"]):
        if usage.setdefault(q, u) != u:
            raise DataFormatError(f"query {q!r} is {usage[q]} in the retrieval solution and {u} in the "
                                  "recognition solution", where=str(root / "recognition_solution_v2.1.csv"))
    queries = sorted((set(gt_images) | set(gt_landmarks)))
    unknown = sorted(set(queries) - set(test["id"]))
    if unknown:
        raise DataFormatError(f"{len(unknown)} solution id(s) are not in test.csv, e.g. {unknown[0]!r}",
                              where=str(root / "test.csv"))
    query = pd.DataFrame({"id": queries})
    query = query.assign(
        label=[(gt_landmarks.get(q) or [NO_LABEL])[0] for q in queries], split="query", domain="landmark",
        source=[f"gldv2:test:{usage[q]}" for q in queries], src=[str(image_path(root, "test", q)) for q in queries],
        gt_easy=[gt_images.get(q) for q in queries],
        gt_labels=[gt_landmarks.get(q) for q in queries])
    rows = pd.concat([train, index, query], ignore_index=True).rename(columns={"id": "image_id"})
    check_unique_ids(rows, str(root))
    keep = ["image_id", "label", "split", "domain", "source", "src", "gt_easy", "gt_labels"]
    return Source(rows[[c for c in keep if c in rows.columns]], "gldv2", "gldv2")
