"""Dataset validation with Great Expectations 1.x (file context under $ILR_HOME/gx, Data Docs HTML).

We compute one row of facts per image (does the file exist and decode, its size, content hash,
perceptual hash, whether its box fits) and let a GX suite judge them, so that every rule shows up in
Data Docs with its failing rows. Dataset-level checks (label distribution, near-duplicates across
splits) are summarised next to it.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from data import manifest
from data.config import SPLITS, DataConfig, data_config, ilr_home, quiet_libraries
from data.errors import ValidationFailed
from data.images import probe_many

log = logging.getLogger(__name__)


@dataclass
class Report:
    success: bool
    failures: list[dict] = field(default_factory=list)   # {expectation, column, count, examples}
    summary: dict = field(default_factory=dict)          # label distribution, near-duplicates, counts
    docs_path: str | None = None

    def text(self) -> str:
        lines = []
        for f in self.failures:
            lines.append(f"  - {f['expectation']} on {f['column']}: {f['count']} row(s) fail; e.g. "
                         + "; ".join(f["examples"]))
        return "\n".join(lines)


def image_facts(df: pd.DataFrame, folder: Path, cfg: DataConfig, origin: pd.Series | None = None) -> pd.DataFrame:
    """The manifest plus one column per checked fact (see module doc). `origin`: the user's file per row."""
    paths = [Path(folder) / p for p in df["path"]]
    infos = probe_many(paths, cfg.max_pixels, min_side_px=1, max_file_mb=cfg.max_file_mb, workers=cfg.workers)
    t = df[["image_id", "path", "label", "split", "domain"]].copy()
    t["file_error"] = [i.error for i in infos]
    t["width"] = [i.width for i in infos]
    t["height"] = [i.height for i in infos]
    t["file"] = origin.to_numpy() if origin is not None else [str(p) for p in paths]
    t["min_side"] = np.minimum(t["width"], t["height"]).where(t["width"] > 0)  # unknown when unreadable
    t["pixels"] = t["width"].astype(np.int64) * t["height"].astype(np.int64)
    t["sha1"] = [i.sha1 or None for i in infos]
    t["_phash"] = np.array([i.phash for i in infos], dtype=np.uint64)
    t["bbox_ok"] = [_bbox_ok(b, w, h) for b, w, h in zip(df["bbox"], t["width"], t["height"])]
    train = t["split"] == "train"
    sizes = t[train].groupby("label")["image_id"].transform("count")
    t["train_class_size"] = pd.Series(np.nan, index=t.index)
    t.loc[train, "train_class_size"] = sizes
    in_index = set(t.loc[(t["split"] == "index") & t["sha1"].notna(), "sha1"])
    in_query = set(t.loc[(t["split"] == "query") & t["sha1"].notna(), "sha1"])
    t["in_index_and_query"] = t["sha1"].isin(in_index & in_query)
    t["leaked_near_duplicate_of"] = _leaks(t, cfg.near_duplicate_bits)
    return t


def _bbox_ok(bbox, w: int, h: int) -> bool:
    if bbox is None or (isinstance(bbox, float) and np.isnan(bbox)):
        return True
    if len(bbox) != 4 or w == 0:
        return False
    x0, y0, x1, y1 = (float(v) for v in bbox)
    # well formed and overlapping the image (revisitop crops the stored pixels and pads what lies outside;
    # w, h are as displayed, so an EXIF-rotated image's stored sides may be swapped)
    return x0 < x1 and y0 < y1 and any(x0 < ww and y0 < hh and x1 > 0 and y1 > 0 for ww, hh in ((w, h), (h, w)))


def nearest_hash(a: np.ndarray, b: np.ndarray, budget: int = 20_000_000) -> tuple[np.ndarray, np.ndarray]:
    """For each 64-bit hash in a: (smallest Hamming distance to b, index in b). Chunked so that at most
    `budget` distances exist at a time; O(len(a) * len(b)) time."""
    dist = np.full(len(a), 65, np.int64)
    arg = np.zeros(len(a), np.int64)
    if len(a) == 0 or len(b) == 0:
        return dist, arg
    step = max(1, budget // len(b))
    for i in range(0, len(a), step):
        d = np.bitwise_count(a[i:i + step, None] ^ b[None, :])
        arg[i:i + step] = d.argmin(axis=1)
        dist[i:i + step] = d[np.arange(len(d)), arg[i:i + step]]
    return dist, arg


def _leaks(t: pd.DataFrame, bits: int) -> list[str | None]:
    """For train/val images: the id of a near-identical index/query image (train-test leakage), else None."""
    ok = t["file_error"].isna().to_numpy()
    fit = np.flatnonzero(t["split"].isin(["train", "val"]).to_numpy() & ok)
    ev = np.flatnonzero(t["split"].isin(["index", "query"]).to_numpy() & ok)
    out: list[str | None] = [None] * len(t)
    h = t["_phash"].to_numpy()
    dist, arg = nearest_hash(h[fit], h[ev])
    ids = t["image_id"].to_numpy()
    for row, d, j in zip(fit, dist, arg):
        if d <= bits:
            out[row] = str(ids[ev[j]])
    return out


def dataset_summary(t: pd.DataFrame, bits: int) -> dict:
    """Label distribution per split and domain, and near-duplicate counts between index and query."""
    dist = {}
    for (split, domain), g in t.groupby(["split", "domain"]):
        per = g["label"].value_counts()
        dist[f"{split}/{domain}"] = {"images": int(len(g)), "labels": int(len(per)),
                                     "per_label_min": int(per.min()), "per_label_median": float(per.median()),
                                     "per_label_max": int(per.max())}
    ok = t["file_error"].isna()
    q = t[(t["split"] == "query") & ok]
    i = t[(t["split"] == "index") & ok]
    near_iq = int((nearest_hash(q["_phash"].to_numpy(), i["_phash"].to_numpy())[0] <= bits).sum())
    return {"label_distribution": dist,
            "near_duplicates": {"train_val_vs_index_query": int(t["leaked_near_duplicate_of"].notna().sum()),
                                "query_vs_index": near_iq, "max_hamming_bits": bits}}


def _suite(cfg: DataConfig, name: str):
    quiet_libraries()
    import great_expectations as gx
    import great_expectations.expectations as gxe

    E = []
    E.append(gxe.ExpectColumnValuesToBeUnique(column="image_id"))
    E.append(gxe.ExpectColumnValuesToNotBeNull(column="label"))
    E.append(gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)))
    E.append(gxe.ExpectColumnValuesToBeInSet(column="domain", value_set=list(cfg.domains)))
    E.append(gxe.ExpectColumnValuesToBeNull(column="file_error"))  # exists, an image, decodes, not too big
    E.append(gxe.ExpectColumnValuesToBeBetween(column="min_side", min_value=cfg.min_side_px))
    E.append(gxe.ExpectColumnValuesToBeBetween(column="pixels", max_value=cfg.max_pixels))
    E.append(gxe.ExpectColumnValuesToBeBetween(column="train_class_size", min_value=2))
    E.append(gxe.ExpectColumnValuesToBeInSet(column="in_index_and_query", value_set=[False]))
    E.append(gxe.ExpectColumnValuesToBeInSet(column="bbox_ok", value_set=[True]))
    E.append(gxe.ExpectColumnValuesToBeNull(column="leaked_near_duplicate_of"))
    return gx.ExpectationSuite(name=name, expectations=E)


def _context():
    quiet_libraries()
    import great_expectations as gx

    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    ctx = gx.get_context(mode="file", project_root_dir=str(ilr_home()))
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    return ctx


def run_expectations(t: pd.DataFrame, name: str, cfg: DataConfig) -> Report:
    """Run the suite as a GX checkpoint (results stored, Data Docs rebuilt) and collect failures."""
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction

    ctx = _context()
    ds = ctx.data_sources.add_or_update_pandas("ilr-datasets")
    asset_name = f"{name}-images"
    asset = next((a for a in ds.assets if a.name == asset_name), None) or ds.add_dataframe_asset(asset_name)
    bd = next((b for b in asset.batch_definitions if b.name == "whole"), None) \
        or asset.add_batch_definition_whole_dataframe("whole")
    suite = ctx.suites.add_or_update(_suite(cfg, f"{name}-suite"))
    vd = ctx.validation_definitions.add_or_update(gx.ValidationDefinition(name=f"{name}-validation", data=bd,
                                                                          suite=suite))
    cp = ctx.checkpoints.add_or_update(gx.Checkpoint(
        name=f"{name}-checkpoint", validation_definitions=[vd],
        actions=[UpdateDataDocsAction(name="update-data-docs")],
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["image_id", "file"]}))
    table = t.drop(columns=["_phash"])
    res = cp.run(batch_parameters={"dataframe": table})
    failures = []
    for vr in res.run_results.values():
        for r in vr.results:
            if r.success:
                continue
            cfg_ = r.expectation_config
            col = cfg_.kwargs.get("column")
            result = r.result or {}
            idx = result.get("unexpected_index_list") or []
            examples = []
            for item in idx[:3]:
                if isinstance(item, dict):
                    row = t[t["image_id"] == item.get("image_id")]
                    val = row[col].iloc[0] if len(row) and col in row else None
                    val = val.item() if hasattr(val, "item") else val
                    examples.append(f"{item.get('image_id')} ({item.get('file')}): {col}={val!r}")
                else:
                    examples.append(repr(item))
            if not examples:
                examples = [repr(v) for v in (result.get("partial_unexpected_list") or [])[:3]]
            failures.append({"expectation": cfg_.type, "column": col,
                             "count": int(result.get("unexpected_count") or len(idx)), "examples": examples})
    docs = None
    try:
        urls = ctx.get_docs_sites_urls()
        docs = urls[0]["site_url"] if urls else None
    except Exception:  # Data Docs are a convenience; validation results stand without them
        log.debug("could not locate Data Docs", exc_info=True)
    return Report(success=not failures, failures=failures, docs_path=docs)


def validate(df: pd.DataFrame, folder: Path, name: str, cfg: DataConfig | None = None,
             report_path: Path | None = None, origin: pd.Series | None = None) -> Report:
    """Validate a dataset folder; raise ValidationFailed (with a readable summary) when any rule fails."""
    cfg = cfg or data_config()
    facts = image_facts(df, Path(folder), cfg, origin)
    report = run_expectations(facts, name, cfg)
    report.summary = {**dataset_summary(facts, cfg.near_duplicate_bits), "counts": manifest.counts(df)}
    if report_path:
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        Path(report_path).write_text(json.dumps({"success": report.success, "failures": report.failures,
                                                 **report.summary}, indent=2, sort_keys=True) + "\n")
    if not report.success:
        raise ValidationFailed(report.text(), report.docs_path)
    return report
