"""Evaluation of a model on a dataset version with the dataset's own protocol, reporting what the
dataset's official evaluation reports.

Protocols (dataset.json):
- `labels`: queries vs index, positives share the label: mAP (the embedded data and folder datasets with
  a query list).
- `leave_one_out`: every index image with another image of its label queries all the others: mAP.
- `sop` (Stanford Online Products): leave-one-out over the test split, Recall@1/10/100/1000 (Song et al.,
  CVPR 2016) as the headline, mAP beside it.
- `revisited` (Revisited Oxford/Paris): mAP Easy/Medium/Hard with junk and mP@k (revisitop), queries
  cropped to their bbx as revisitop crops them (the unrotated image, outside the image padded black).
- `gldv2`: retrieval mAP@100 (DELF's `MeanAveragePrecision`) and recognition GAP, GAP ignoring
  non-landmark queries and top-1 accuracy (DELF's `GlobalAveragePrecision`, `Top1Accuracy`), overall and
  per Usage (Public / Private) as `compute_recognition_metrics.py` / `compute_retrieval_metrics.py`
  print them. Recognition is DELG's: k-NN over the *train* images (global top-K, re-ranked), the label
  of the best one, DELG's recognition score; predictions are train landmark ids.
- `met` (the Met): mAP over the test queries with a label, and the three official numbers of
  nikosips/met `knn_eval.py`: GAP with the distractor queries kept, GAP without them, accuracy on the
  non-distractor queries, from its k-NN classifier over the exhibit images (global descriptors, no PCA
  whitening: ilr's descriptors are whitened by the model; `--raw` in the official script), K and the
  temperature tuned by GAP on the validation queries (`--autotune`), K=1, t=1 without them.

Global search is exact (a matrix product); re-ranking re-orders the top-K with local features stored
compactly (int8), as the service stores them.
"""
from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from data import manifest
from data.config import NO_LABEL, ilr_home
from data.errors import IlrError
from data.images import load_rgb
from data.versioning import dataset_dir
from models import metrics, registry, tracking
from models.config import ExtractConfig, RerankConfig, extract_config, rerank_config, resolve_device
from models.extract import Extractor
from models.features import Features, pack_local, recognition_score, unpack_local
from models.rerank import Reranker

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    summary: dict
    per_query: pd.DataFrame
    csv_path: Path | None = None
    run_id: str | None = None


def _crop(row, folder: Path) -> np.ndarray:
    arr = load_rgb(folder / row["path"])
    box = row["bbox"]
    if isinstance(box, (list, tuple, np.ndarray)) and len(box) == 4:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        arr = arr[max(0, y0):max(y0 + 1, y1), max(0, x0):max(x0 + 1, x1)]
    return arr


def _local(features: list[Features], compact: bool) -> list[tuple]:
    """(keypoints, descriptors, original size) per image, as stored (int8) when `compact`."""
    return [(*(unpack_local(*pack_local(f)) if compact else (f.keypoints, f.descriptors)), f.size)
            for f in features]


def rank(q_global: np.ndarray, db_global: np.ndarray, exclude_self: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine search. Returns (orders [Q x N] best first, similarities [Q x N])."""
    sims = q_global @ db_global.T
    if exclude_self is not None:
        sims[np.arange(len(sims)), exclude_self] = -np.inf
    return np.argsort(-sims, axis=1, kind="stable"), sims


def rerank_orders(orders: np.ndarray, sims: np.ndarray, q_local, db_local, reranker: Reranker,
                  progress: Callable[[int], None] | None = None, q_global: np.ndarray | None = None,
                  db_global: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-order each query's top-K with the re-ranker's score (global descriptors given: refined first, as
    the service does); returns (orders, inliers of the new top-K, DELG recognition scores of the new top-K)."""
    k = min(reranker.cfg.top_k, orders.shape[1])
    new, inl_out, score_out = orders.copy(), np.zeros((len(orders), k), np.int64), np.zeros((len(orders), k))
    for qi in range(len(orders)):
        top = orders[qi, :k]
        top = top[np.isfinite(sims[qi, top])]  # leave-one-out: the query itself is not a candidate
        r = reranker.rerank(q_local[qi][0], q_local[qi][1], [db_local[j] for j in top], sims[qi, top],
                            *((q_global[qi], db_global[top]) if q_global is not None else ()))
        new[qi, :len(top)] = top[r.order]
        inl_out[qi, :len(top)] = r.inliers[r.order]
        score_out[qi, :len(top)] = r.recognition[r.order]
        progress and progress(qi + 1)
    return new, inl_out, score_out


def _ids(value) -> list:
    return list(value) if isinstance(value, (list, tuple, np.ndarray)) else []


def _ground_truth(protocol: str, queries: pd.DataFrame, index: pd.DataFrame, self_pos: np.ndarray | None):
    """positives[q], junk[q] as index positions (labels protocols); gnd dicts (revisited)."""
    pos_of = {iid: i for i, iid in enumerate(index["image_id"])}
    if protocol == "revisited":
        return [{k: [pos_of[x] for x in _ids(row[f"gt_{k}"]) if x in pos_of] for k in ("easy", "hard", "junk")}
                for _, row in queries.iterrows()]
    if protocol == "gldv2":
        return [[pos_of[x] for x in _ids(row["gt_easy"]) if x in pos_of] for _, row in queries.iterrows()]
    labels = index["label"].to_numpy()
    by_label: dict[str, np.ndarray] = {}
    for lab in set(queries["label"]):
        by_label[lab] = np.flatnonzero(labels == lab) if lab != NO_LABEL else np.zeros(0, np.int64)
    out = []
    for qi, lab in enumerate(queries["label"]):
        p = by_label[lab]
        out.append(p[p != self_pos[qi]] if self_pos is not None else p)  # leave-one-out: not itself
    return out


def _revisited_crop(row, folder: Path) -> np.ndarray:
    """A Revisited query as revisitop crops it: the image as stored (no EXIF rotation), PIL's crop of the
    bbx (rounded), parts outside the image black."""
    from PIL import Image

    with Image.open(folder / row["path"]) as im:
        return np.asarray(im.convert("RGB").crop(tuple(float(v) for v in row["bbox"])))


def _usage(queries: pd.DataFrame) -> np.ndarray:
    """GLDv2 Usage per query, from its source (gldv2:test:Public); "" for older manifests."""
    return np.array([s.split(":")[2] if isinstance(s, str) and s.count(":") >= 2 else "" for s in queries["source"]])


def _gldv2_report(df, folder, queries, q_feats, q_g, final, index, extractor, rcfg, rerank, compact,
                  log_fn) -> tuple[dict, dict]:
    """Retrieval mAP@100 per Usage, and recognition the published way: k-NN over the train images."""
    out: dict = {}
    usage = _usage(queries)
    ids = index["image_id"].to_numpy()
    qids = [str(q) for q in queries["image_id"]]
    ret_sol = {q: _ids(v) for q, v in zip(qids, queries["gt_easy"]) if len(_ids(v))}
    ret_pred = {q: list(ids[o[:100]]) for q, o in zip(qids, final) if q in ret_sol}
    rec_sol = {q: [str(x) for x in _ids(v)] for q, v in zip(qids, queries["gt_labels"])
               if isinstance(v, (list, tuple, np.ndarray))}
    train = df[df["split"].isin(["train", "val"]) & (df["label"] != NO_LABEL)].reset_index(drop=True)
    rec_pred: dict = {}
    cols = {"usage": usage, "predicted_label": [None] * len(qids), "recognition_score": [np.nan] * len(qids)}
    if len(train) and rec_sol:
        t0 = time.perf_counter()
        t_feats = extractor.extract([folder / p for p in train["path"]])
        t_g = np.stack([f.global_desc for f in t_feats])
        orders, sims = rank(q_g, t_g)
        if rerank:
            orders, _, rec = rerank_orders(orders, sims, _local(q_feats, compact), _local(t_feats, compact),
                                           Reranker(rcfg), q_global=q_g, db_global=t_g)
            score = rec[:, 0]
        else:
            score = recognition_score(np.zeros(len(orders)), sims[np.arange(len(orders)), orders[:, 0]])
        labels = train["label"].to_numpy()
        pred_labels = [str(labels[o[0]]) for o in orders]
        rec_pred = {q: (lab, float(sc)) for q, lab, sc in zip(qids, pred_labels, score)}  # train images are labelled
        cols["predicted_label"], cols["recognition_score"] = pred_labels, score
        log_fn(f"recognition: k-NN over {len(train)} train images in {time.perf_counter() - t0:.1f}s")
    elif rec_sol:
        log_fn("recognition: the dataset has no labelled train images; recognition is not evaluated")
    for name, keep in (("", None), ("_public", "Public"), ("_private", "Private")):
        sel = {q for q, u in zip(qids, usage) if keep is None or u == keep}
        if keep is not None and not sel:
            continue
        rs = {q: v for q, v in ret_sol.items() if q in sel}
        if rs:
            out[f"map_at_100{name}"] = metrics.gldv2_map_at_k({q: ret_pred[q] for q in rs}, rs)
        cs = {q: v for q, v in rec_sol.items() if q in sel}
        if cs and rec_pred:
            pr = {q: p for q, p in rec_pred.items() if q in cs}
            out[f"gap{name}"] = metrics.gap(pr, cs)
            out[f"gap_landmarks_only{name}"] = metrics.gap(pr, cs, ignore_non_landmarks=True)
            out[f"top1_accuracy{name}"] = metrics.top1_accuracy(pr, cs)
    return out, cols


# the official grid of nikosips/met knn_eval.py --autotune
MET_K = (1, 2, 3, 5, 7, 10, 15, 20, 50)
MET_T = (0.01, 0.1, 1.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 50.0, 100.0, 500.0)


def _met_report(queries, q_g, val, val_feats, db_g, index, log_fn) -> tuple[dict, dict]:
    """The Met's official numbers from its k-NN classifier over the exhibit images (see the module doc)."""
    labels = index["label"].to_numpy().astype(object)
    n_classes = len(set(labels))
    kmax = min(max(MET_K), len(labels))

    def neighbours(g):
        sims = g @ db_g.T
        top = np.argsort(-sims, axis=1, kind="stable")[:, :kmax]
        return np.take_along_axis(sims, top, axis=1), labels[top]

    k, t = 1, 1.0
    truth = val["label"].to_numpy().astype(object) if val is not None else np.zeros(0, object)
    if (truth != NO_LABEL).any():  # GAP needs a labelled validation query to tune on
        vs, vl = neighbours(np.stack([f.global_desc for f in val_feats]))
        best = -1.0
        for kk in MET_K:
            if kk > kmax:
                continue
            for tt in MET_T:
                p, c = metrics.knn_classify(vs, vl, n_classes, kk, tt)
                g = metrics.met_scores(p, c, truth, NO_LABEL)["gap"]
                if g > best:  # the first of equals, in grid order, as the official tuning
                    best, k, t = g, kk, tt
        log_fn(f"the Met: k-NN tuned on {len(val)} validation queries: K {k}, t {t:g} (GAP {best:.4f})")
    s, lab = neighbours(q_g)
    preds, confs = metrics.knn_classify(s, lab, n_classes, k, t)
    out = {f"met_{key}": v for key, v in metrics.met_scores(preds, confs, queries["label"].to_numpy().astype(object),
                                                            NO_LABEL).items()}
    return {**out, "met_knn_k": k, "met_knn_t": t}, {"predicted_label": preds, "confidence": confs}


def evaluate(dataset: str, model_uri: str | None = None, rerank: bool = True,
             ecfg: ExtractConfig | None = None, rcfg: RerankConfig | None = None, compact: bool = True,
             out_dir: Path | None = None, log_mlflow: bool = True, log_fn: Callable[[str], None] = print,
             model=None, model_name: str | None = None) -> Evaluation:
    """Extract, search, optionally re-rank, and score `dataset` (NAME[@VERSION]) with its protocol."""
    ecfg, rcfg = ecfg or extract_config(), rcfg or rerank_config()
    version, folder = dataset_dir(dataset)
    df, info = manifest.read(folder), manifest.read_info(folder)
    protocol = info.get("protocol", "labels")
    device = resolve_device(ecfg.device)
    if model is None:
        model, model_name = registry.resolve(model_uri, device)
    extractor = Extractor(model, ecfg, device)
    index = df[df["split"] == "index"].reset_index(drop=True)
    if len(index) == 0:
        raise IlrError(f"dataset {version.ref} has no index images")
    loo = protocol in ("leave_one_out", "sop")
    t0 = time.perf_counter()
    idx_feats = extractor.extract([folder / p for p in index["path"]])
    val, val_feats = None, []
    if loo:
        counts = index[index["label"] != NO_LABEL]["label"].value_counts()
        q_pos = np.flatnonzero(index["label"].isin(counts[counts >= 2].index).to_numpy())
        queries = index.iloc[q_pos].reset_index(drop=True)
        q_feats = [idx_feats[i] for i in q_pos]
    else:
        queries = df[df["split"] == "query"].reset_index(drop=True)
        if protocol == "met":  # the validation queries tune the k-NN classifier; the test queries are scored
            is_val = queries["source"].fillna("").str.startswith("met:val:").to_numpy()
            val, queries = queries[is_val].reset_index(drop=True), queries[~is_val].reset_index(drop=True)
            val_feats = extractor.extract([folder / p for p in val["path"]])
        crop = _revisited_crop if protocol == "revisited" else _crop
        q_feats = extractor.extract([crop(r, folder) for _, r in queries.iterrows()])
        q_pos = None
    if len(queries) == 0:
        raise IlrError(f"dataset {version.ref} has no queries for protocol {protocol!r}")
    extract_s = time.perf_counter() - t0
    log_fn(f"extracted {len(index)} index and {len(queries)} query images in {extract_s:.1f}s")
    db_g = np.stack([f.global_desc for f in idx_feats])
    q_g = np.stack([f.global_desc for f in q_feats])
    orders, sims = rank(q_g, db_g, q_pos)
    gt = _ground_truth(protocol, queries, index, q_pos)

    def score(ords: np.ndarray) -> dict:
        if protocol == "revisited":
            return metrics.revisited_map(ords, gt)
        r = metrics.retrieval_map(ords, gt)
        if protocol == "sop":
            r.update(metrics.recall_at_k(ords, gt))
        ids = index["image_id"].to_numpy()
        sol = {str(q): list(ids[p]) for q, p in zip(queries["image_id"], gt) if len(p)}
        pred = {str(q): list(ids[o[:100]]) for q, o in zip(queries["image_id"], ords) if str(q) in sol}
        out = {"map": r["map"], "map_at_100": metrics.gldv2_map_at_k(pred, sol),
               **{k: v for k, v in r.items() if k.startswith(("mp_at_", "recall_at_"))}, "aps": r["aps"]}
        return out

    summary = {"protocol": protocol, "queries": len(queries), "index": len(index), "extract_s": extract_s}
    glob = score(orders)
    summary.update({f"global_{k}": v for k, v in glob.items() if not k.endswith("aps")})
    final, inliers, rec = orders, None, None
    if rerank:
        t1 = time.perf_counter()
        final, inliers, rec = rerank_orders(orders, sims, _local(q_feats, compact), _local(idx_feats, compact),
                                            Reranker(rcfg), q_global=q_g, db_global=db_g)
        summary["rerank_s_per_query"] = (time.perf_counter() - t1) / len(queries)
        rr = score(final)
        summary.update({f"rerank_{k}": v for k, v in rr.items() if not k.endswith("aps")})
    served = rr if rerank else glob
    headline = {"revisited": "medium", "gldv2": "map_at_100"}.get(protocol, "map")  # each protocol's own
    best = summary[f"rerank_{headline}" if rerank else f"global_{headline}"]
    summary["map"] = best
    per_query = pd.DataFrame({
        "query_id": queries["image_id"], "label": queries["label"],
        "ap": served.get("medium_aps" if protocol == "revisited" else "aps"),
        "top1_id": index["image_id"].to_numpy()[final[:, 0]], "top1_label": index["label"].to_numpy()[final[:, 0]],
        "top1_global_score": sims[np.arange(len(final)), final[:, 0]],
        "top1_inliers": inliers[:, 0] if inliers is not None else 0})
    if protocol == "revisited":
        per_query["ap_easy"], per_query["ap_hard"] = served["easy_aps"], served["hard_aps"]
    if protocol == "sop":
        summary["recall_at_1"] = served["recall_at_1"]
    if protocol == "gldv2":
        extra, cols = _gldv2_report(df, folder, queries, q_feats, q_g, final, index, extractor, rcfg, rerank,
                                    compact, log_fn)
        summary.update(extra)
        per_query = per_query.assign(**cols)
    if protocol == "met":
        extra, cols = _met_report(queries, q_g, val, val_feats, db_g, index, log_fn)
        summary.update(extra)
        per_query = per_query.assign(**cols)
    out_dir = Path(out_dir or ilr_home() / "evaluations")
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"{version.name}-{version.version}-{int(time.time())}.csv"
    per_query.to_csv(csv_path, index=False, quoting=csv.QUOTE_MINIMAL)
    run_id = None
    if log_mlflow:
        import mlflow

        tracking.setup("ilr-evaluation")
        with mlflow.start_run(run_name=f"eval {version.ref}") as run:
            run_id = run.info.run_id
            mlflow.set_tags({"dataset": version.name, "dataset.version": version.version,
                             "dataset.dvc_md5": version.dvc_md5, "model": model_name or "", "rerank": rerank,
                             "protocol": protocol, "git_sha": tracking.git_sha(), "ilr.kind": "evaluate"})
            mlflow.log_params({f"extract.{k}": v for k, v in vars(ecfg).items()})
            mlflow.log_metrics({k: float(v) for k, v in summary.items()
                                if isinstance(v, (int, float)) and not np.isnan(v)})
            mlflow.log_artifact(str(csv_path))
    summary["model"] = model_name
    return Evaluation(summary, per_query, csv_path, run_id)
