"""Revisited Oxford / Paris: gnd_<name>.pkl (imlist, qimlist, gnd[i] = {bbx, easy, hard, junk}, 0-based)
and images in jpg/<name>.jpg. Queries keep their bbx; evaluation crops them (protocol rule)."""
from __future__ import annotations

import pickle
from pathlib import Path

import pandas as pd

from data.config import NO_LABEL
from data.errors import DataFormatError
from data.formats.common import Source
from data.manifest import check_image_id, check_unique_ids


class _SafeUnpickler(pickle.Unpickler):
    """The ground-truth pickle holds only dicts, lists, numbers and numpy arrays: refuse anything else.
    Pickles written at protocol 0-2 (as revisitop's gnd_roxford5k.pkl / gnd_rparis6k.pkl are) carry an
    array's bytes as text re-encoded by `_codecs.encode` (latin-1) and an empty array's as `bytes()`:
    those two pure functions are allowed; Python 2's strings are read as latin-1, as numpy needs."""

    def find_class(self, module, name):
        if module.startswith("numpy") and name in {"ndarray", "dtype", "_reconstruct", "scalar", "_frombuffer"}:
            return super().find_class(module, name)
        if (module, name) in {("_codecs", "encode"), ("__builtin__", "bytes"), ("builtins", "bytes")}:
            return super().find_class(module, name)
        raise DataFormatError(f"refusing to unpickle {module}.{name}: the ground-truth file may only hold "
                              "plain data")


def read(root: Path, gnd: str | None = None, **_) -> Source:
    """gnd: which ground-truth file (gnd_<name>.pkl, or <name>) when the folder holds several."""
    root = Path(root)
    pkls = sorted(root.glob("gnd_*.pkl"))
    if gnd:
        want = gnd if gnd.endswith(".pkl") else f"gnd_{gnd.removeprefix('gnd_')}.pkl"
        pkls = [p for p in pkls if p.name == want]
        if not pkls:
            raise DataFormatError(f"no ground-truth file {want}", where=str(root))
    if not pkls:
        raise DataFormatError("no gnd_<name>.pkl found", where=str(root))
    if len(pkls) > 1:
        raise DataFormatError(f"{len(pkls)} ground-truth files ({', '.join(p.name for p in pkls)}): choose one "
                              "with --gnd NAME", where=str(root))
    pkl = pkls[0]
    try:
        with open(pkl, "rb") as f:
            cfg = _SafeUnpickler(f, encoding="latin1").load()
    except DataFormatError:
        raise
    except Exception as e:
        raise DataFormatError(f"cannot read ground-truth pickle ({e})", where=str(pkl)) from None
    for key in ("imlist", "qimlist", "gnd"):
        if key not in cfg:
            raise DataFormatError(f"missing key {key!r}", where=str(pkl))
    imlist, qimlist, gnd = list(cfg["imlist"]), list(cfg["qimlist"]), list(cfg["gnd"])
    if len(gnd) != len(qimlist):
        raise DataFormatError(f"{len(gnd)} gnd entries for {len(qimlist)} queries", where=str(pkl))
    for i, name in enumerate(imlist + qimlist):
        check_image_id(name, f"{pkl}, {'imlist' if i < len(imlist) else 'qimlist'}[{i % max(len(imlist), 1)}]")
    rows = [{"image_id": n, "label": NO_LABEL, "split": "index", "source": f"{pkl.stem}:imlist",
             "src": str(root / "jpg" / f"{n}.jpg")} for n in imlist]
    for qi, (name, g) in enumerate(zip(qimlist, gnd)):
        where = f"{pkl}, gnd[{qi}]"
        for key in ("bbx", "easy", "hard", "junk"):
            if key not in g:
                raise DataFormatError(f"missing key {key!r}", where=where)

        def names(idx, key=None):
            out = []
            for j in list(idx):
                if not 0 <= int(j) < len(imlist):
                    raise DataFormatError(f"{key} index {int(j)} outside imlist (0..{len(imlist) - 1})", where=where)
                out.append(imlist[int(j)])
            return out

        bbx = [float(v) for v in list(g["bbx"])]
        if len(bbx) != 4:
            raise DataFormatError(f"bbx must have 4 numbers, got {bbx}", where=where)
        rows.append({"image_id": name, "label": name, "split": "query", "source": f"{pkl.stem}:qimlist",
                     "src": str(root / "jpg" / f"{name}.jpg"), "bbox": bbx,
                     "gt_easy": names(g["easy"], "easy"), "gt_hard": names(g["hard"], "hard"),
                     "gt_junk": names(g["junk"], "junk")})
    df = pd.DataFrame(rows).assign(domain="landmark")
    check_unique_ids(df, str(pkl))
    return Source(df, "revisited", "roxford")
