"""Instance folders: root/<label>/<image>. Optional query list; without one, leave-one-out."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from data.errors import DataFormatError
from data.formats.common import Source
from data.images import IMAGE_EXTENSIONS
from data.manifest import check_unique_ids, safe_id


def read(root: Path, domain: str = "other", queries: Path | None = None, **_) -> Source:
    """Every image file under root/<label>/ becomes an index image labelled <label>.

    queries: optional text file of paths relative to root (one per line) that form the query split.
    Without it the protocol is leave-one-out: each image with another image of its label queries the rest.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataFormatError("folder not found", where=str(root))
    rows = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(label_dir.rglob("*")):
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS:
                rel = f.relative_to(root).as_posix()
                rows.append({"image_id": f"{safe_id(label_dir.name)}__{safe_id(str(f.relative_to(label_dir).with_suffix('')))}",
                             "label": label_dir.name, "split": "index", "domain": domain,
                             "source": f"folder:{rel}", "src": str(f.resolve()), "_rel": rel})
    if not rows:
        raise DataFormatError("no images found: expected root/<label>/<image>.jpg "
                              f"(extensions {', '.join(IMAGE_EXTENSIONS)})", where=str(root))
    df = pd.DataFrame(rows)
    check_unique_ids(df, str(root))
    protocol = "leave_one_out"
    if queries is not None:
        wanted = [ln.strip() for ln in Path(queries).read_text().splitlines() if ln.strip()]
        unknown = sorted(set(wanted) - set(df["_rel"]))
        if unknown:
            raise DataFormatError(f"{len(unknown)} query path(s) not under the root, e.g. {unknown[0]!r}",
                                  where=str(queries))
        df.loc[df["_rel"].isin(wanted), "split"] = "query"
        protocol = "labels"
    return Source(df.drop(columns="_rel"), protocol, "folder")
