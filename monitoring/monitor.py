"""Quality canary, query drift and ANN recall of the live service; the quality-drop decision.

- Canary: labelled queries of the dataset the live index serves are sent to the running endpoint; GLDv2
  retrieval mAP@k (relevant = index images of the query's instance), recall@k, top-1 accuracy, errors and
  client-side latency percentiles are recorded with the model and index versions (SQLite, and MLflow);
  so are each query's AP@k, domain and first result, with thumbnails of the worst few (the dashboard).
- Drift: recent query descriptors (kept by the service) against a sample of the index: MMD^2 with an RBF
  kernel (median-distance bandwidth), centroid shift, and mean top-1 similarity of queries vs index.
- ANN recall: Milvus search against exact search on a sample of the live collection's own vectors.
- Golden suites: the live model's served and global mAP on each golden suite (gate.suites, real photos)
  with the served settings, measured once per model version and setting (the gate's cache); a suite more
  than gate.max_regression below the best served mAP the service had there is a quality drop (a champion
  promoted past the gate, or a settings change that hurts real photos).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from data import manifest
from data.config import NO_LABEL
from data.versioning import dataset_dir
from models.metrics import gldv2_map_at_k
from monitoring.config import MonitorConfig, monitor_config
from monitoring.store import MonitorStore

THUMB_SIDE = 128  # px, the dashboard's worst-query thumbnails


@dataclass
class CanaryResult:
    model: str
    index: str
    dataset: str
    queries: int
    map_at_k: float
    recall_at_k: float
    top1: float
    errors: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    stages: dict
    per_query: list = field(default_factory=list, repr=False)  # each answered query: AP@k, domain, first result


def canary(client, cfg: MonitorConfig | None = None, dataset: str | None = None) -> CanaryResult:
    """Query the live service with the labelled query set of its dataset (or `dataset`)."""
    from serving.client import ServiceError

    cfg = cfg or monitor_config()
    health = client.health()
    ref = dataset or health.get("dataset")
    if not ref:
        raise ValueError("the service has no live index to check")
    _, folder = dataset_dir(ref)
    df = manifest.read(folder)
    index = df[df["split"] == "index"]
    queries = df[(df["split"] == "query") & (df["label"] != NO_LABEL)]
    queries = queries.sample(n=min(cfg.canary_queries, len(queries)), random_state=0) if len(queries) else queries
    relevant = index[index["label"] != NO_LABEL].groupby("label")["image_id"].apply(list).to_dict()
    preds, solution, lat, stages, errors, hits, top1, per_query = {}, {}, [], {}, 0, [], [], []
    model = idx = None
    for _, q in queries.iterrows():
        t = time.perf_counter()
        try:
            res = client.search(folder / q["path"], top_k=cfg.k, rerank=True)
        except ServiceError:
            errors += 1
            continue
        lat.append((time.perf_counter() - t) * 1000)
        model, idx = res["model"], res["index"]
        for k, v in res["timings_ms"].items():
            stages.setdefault(k, []).append(v)
        ids = [r["image_id"] for r in res["results"]]
        rel = relevant.get(q["label"], [])
        preds[q["image_id"]], solution[q["image_id"]] = ids, rel
        hits.append(bool(set(ids[:cfg.recall_k]) & set(rel)))
        top1.append(bool(res["results"]) and res["results"][0]["label"] == q["label"])
        first = res["results"][0] if res["results"] else {}
        found = set(rel)
        per_query.append({
            "query_id": q["image_id"], "label": q["label"], "domain": q["domain"], "path": str(folder / q["path"]),
            "ap": float(gldv2_map_at_k({q["image_id"]: ids}, {q["image_id"]: rel}, cfg.k)), "top1": top1[-1],
            "first_id": first.get("image_id"), "first_label": first.get("label"),
            # an image of the right instance: the best-ranked one, or any when none was found
            "expected_id": next((i for i in ids if i in found), rel[0] if rel else None)})
    pct = (lambda p: float(np.percentile(lat, p))) if lat else (lambda p: float("nan"))
    return CanaryResult(model or health.get("model", ""), idx or health.get("index", ""), ref, len(lat),
                        float(gldv2_map_at_k(preds, solution, cfg.k)) if solution else 0.0,
                        float(np.mean(hits)) if hits else 0.0, float(np.mean(top1)) if top1 else 0.0, errors,
                        pct(50), pct(95), pct(99), {k: float(np.median(v)) for k, v in stages.items()}, per_query)


def record_queries(store: MonitorStore, client, c: CanaryResult, ts: float, worst: int) -> None:
    """Each canary query's result (table `canary_queries`: the dashboard's quality per domain), and small
    JPEGs of the `worst` imperfect ones: the query, an image of its instance, and what came first."""
    import io

    from PIL import Image

    from data.images import file_thumbnail, thumbnail_jpeg

    store.add_many("canary_queries", [{"ts": ts, "model": c.model, "idx": c.index, "dataset": c.dataset,
                                       **{k: v for k, v in q.items() if k != "path"}} for q in c.per_query])

    def small(image_id: str | None) -> bytes | None:
        jpeg = client.thumbnail(image_id) if image_id else None
        if jpeg is None:
            return None
        return thumbnail_jpeg(Image.open(io.BytesIO(jpeg)), THUMB_SIDE)

    bad = sorted((q for q in c.per_query if q["ap"] < 1), key=lambda q: (q["ap"], q["query_id"]))[:worst]
    for q in bad:
        store.add("canary_thumbs", ts=ts, query_id=q["query_id"], query_jpeg=file_thumbnail(q["path"], THUMB_SIDE),
                  expected_jpeg=small(q["expected_id"]), first_jpeg=small(q["first_id"]))
    store.prune_thumbs()


def suite_canary(model: str, store: MonitorStore, gcfg=None, ecfg=None, log_fn=print) -> list[str]:
    """Score the live model (`models:/NAME/V`) on the golden suites, record the scores (table `suites`)
    and return the quality-drop reasons. The reference per suite is the best served mAP recorded for it:
    champions after gate decisions and earlier passes."""
    from models import gate, registry
    from models.config import extract_config, gate_config, rerank_config

    gcfg, ecfg, rcfg = gcfg or gate_config(), ecfg or extract_config(), rerank_config()
    version = registry.version_of(model)
    if not gcfg.suites or version is None:
        return []
    best: dict[str, float] = {}
    for r in store.rows("gate") + store.rows("suites"):
        best[r["dataset"]] = max(best.get(r["dataset"], float("-inf")), r["served"])
    reasons = []
    for ref in gate.suite_refs(gcfg, log_fn):
        s = gate.score(version, ref, ecfg, rcfg, log_fn)
        store.add("suites", model=model, dataset=ref, served=s.served, global_map=s.global_)
        if ref in best and s.served < best[ref] - gcfg.max_regression:
            reasons.append(f"golden suite {ref}: served mAP {s.served:.4f} is more than {gcfg.max_regression} "
                           f"below the best the service had ({best[ref]:.4f})")
    return reasons


def mmd_rbf(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with an RBF kernel whose bandwidth is the median pairwise distance."""
    if len(x) < 2 or len(y) < 2:
        return float("nan")
    z = np.concatenate([x, y]).astype(np.float64)
    sq = np.maximum((z ** 2).sum(1)[:, None] + (z ** 2).sum(1)[None] - 2 * z @ z.T, 0)
    sigma2 = np.median(sq[np.triu_indices(len(z), 1)]) or 1.0
    k = np.exp(-sq / sigma2)
    n, m = len(x), len(y)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    return float((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2 * kxy.mean())


def drift(queries: np.ndarray, index_sample: np.ndarray) -> dict:
    q, x = np.asarray(queries, np.float32), np.asarray(index_sample, np.float32)
    if len(q) == 0 or len(x) == 0:
        return {"queries": int(len(q)), "mmd": float("nan"), "centroid_shift": float("nan"),
                "query_top1_sim": float("nan"), "index_top1_sim": float("nan")}
    cq, cx = q.mean(0), x.mean(0)
    self_sim = x @ x.T
    np.fill_diagonal(self_sim, -np.inf)
    return {"queries": int(len(q)), "mmd": mmd_rbf(q, x),
            "centroid_shift": float(1 - cq @ cx / (np.linalg.norm(cq) * np.linalg.norm(cx) + 1e-12)),
            "query_top1_sim": float((q @ x.T).max(1).mean()),
            "index_top1_sim": float(self_sim.max(1).mean()) if len(x) > 1 else float("nan")}


def ann_recall(collection: str, cfg: MonitorConfig | None = None) -> float:
    """Live collection: Milvus top-k against exact search, on a sample of its own vectors."""
    from serving.config import index_config
    from serving.store import LocalFeatureStore, store_dir
    from serving.vectors import VectorIndex, recall_at_k

    cfg = cfg or monitor_config()
    store = LocalFeatureStore(store_dir(collection))
    try:
        ids, vectors = store.global_vectors()
    finally:
        store.close()
    icfg = index_config()
    return recall_at_k(VectorIndex.connect(collection), ids, vectors, cfg.k, cfg.ann_sample, icfg.ef_search, seed=int(time.time()))


@dataclass
class MonitorReport:
    canary: CanaryResult
    drift: dict
    ann_recall: float
    quality_drop: bool
    drifted: bool
    reason: str
    new_drop: bool = False   # a drop that the previous pass did not already report (the trigger fires on it)


def run(client, cfg: MonitorConfig | None = None, store: MonitorStore | None = None, log_mlflow: bool = True,
        dataset: str | None = None) -> MonitorReport:
    """One monitoring pass: canary + drift + ANN recall, recorded; decides whether quality dropped."""
    cfg = cfg or monitor_config()
    own = store is None
    store = store or MonitorStore()
    try:
        history = [r for r in store.rows("canary") if r["queries"]]
        c = canary(client, cfg, dataset)
        ts = time.time()
        store.add("canary", ts=ts, model=c.model, idx=c.index, dataset=c.dataset, queries=c.queries, map_at_k=c.map_at_k,
                  recall_at_k=c.recall_at_k, top1=c.top1, errors=c.errors, p50_ms=c.p50_ms, p95_ms=c.p95_ms,
                  p99_ms=c.p99_ms, stages=c.stages)
        try:  # the per-query record (and its thumbnails) must not hide the quality decision either
            record_queries(store, client, c, ts, cfg.worst_queries)
        except Exception as e:  # noqa: BLE001 - recorded and reported
            store.add("events", kind="monitor_error", reason=f"canary queries: {type(e).__name__}: {e}"[:500], detail={})
        try:  # drift and ANN recall must not hide the quality decision
            emb = client.embeddings(n=500)
            sample = np.asarray(emb["index_sample"], np.float32)
            d = drift(np.asarray(emb["queries"], np.float32).reshape(-1, sample.shape[1] if sample.ndim == 2 else 0), sample)
            store.add("drift", model=c.model, idx=c.index, **d)
        except Exception as e:  # noqa: BLE001 - recorded and reported
            d = drift(np.zeros((0, 1)), np.zeros((0, 1)))
            store.add("events", kind="monitor_error", reason=f"drift: {type(e).__name__}: {e}"[:500], detail={})
        try:
            recall = ann_recall(c.index, cfg)
            store.add("ann", idx=c.index, recall=recall, k=cfg.k, queries=cfg.ann_sample)
        except Exception as e:  # noqa: BLE001
            recall = float("nan")
            store.add("events", kind="monitor_error", reason=f"ANN recall: {type(e).__name__}: {e}"[:500], detail={})
        best_same = max((r["map_at_k"] for r in history if r["model"] == c.model and r["idx"] == c.index),
                        default=None)
        reasons = []
        if c.queries == 0:
            reasons.append(f"canary: all {c.errors} queries failed")
        if c.map_at_k < cfg.min_map:
            reasons.append(f"mAP@{cfg.k} {c.map_at_k:.3f} < {cfg.min_map}")
        if best_same is not None and c.map_at_k < best_same - cfg.max_drop:
            reasons.append(f"mAP@{cfg.k} {c.map_at_k:.3f} dropped more than {cfg.max_drop} below {best_same:.3f}")
        drifted = bool(np.isfinite(d["mmd"]) and d["mmd"] > cfg.max_drift_mmd)
        if recall < cfg.min_ann_recall:
            reasons.append(f"ANN recall {recall:.3f} < {cfg.min_ann_recall}")
        if cfg.suites:
            try:
                reasons += suite_canary(c.model, store, log_fn=lambda *_: None)
            except Exception as e:  # noqa: BLE001 - recorded and reported; the pass goes on
                store.add("events", kind="monitor_error", reason=f"golden suites: {type(e).__name__}: {e}"[:500],
                          detail={})
        reason = "; ".join(reasons)
        report = MonitorReport(c, d, recall, bool(reasons), drifted, reason,
                               record_quality(store, c.model, c.index, reason))
        if log_mlflow:
            _log(report, cfg)
        return report
    finally:
        if own:
            store.close()


def record_quality(store: MonitorStore, model: str, index: str, drop_reason: str) -> bool:
    """Record this pass's verdict; True when it is a new drop. The retrain trigger fires once per drop: not
    again on every pass while the same model and index stay below the bar, again after they recovered or
    once another model or index is live."""
    prev = store.last_event("quality_drop", "quality_ok")
    same = prev is not None and prev["detail"].get("model") == model and prev["detail"].get("index") == index
    if drop_reason:
        new = not (same and prev["kind"] == "quality_drop")
        store.add("events", kind="quality_drop", reason=drop_reason, detail={"model": model, "index": index, "new": new})
        return new
    if prev is not None and prev["kind"] == "quality_drop":
        store.add("events", kind="quality_ok", reason="quality back above the bar", detail={"model": model, "index": index})
    return False


def _log(report: MonitorReport, cfg: MonitorConfig) -> None:
    import mlflow

    from models import tracking

    exp = tracking.setup("ilr-monitoring")
    c = report.canary
    with mlflow.start_run(experiment_id=exp, run_name=f"monitor {c.index}"):
        mlflow.set_tags({"ilr.kind": "monitor", "model": c.model, "index": c.index, "dataset": c.dataset,
                         "quality_drop": report.quality_drop, "reason": report.reason})
        mlflow.log_metrics({f"canary_map_at_{cfg.k}": c.map_at_k, f"canary_recall_at_{cfg.recall_k}": c.recall_at_k,
                            "canary_top1": c.top1, "canary_errors": c.errors, "latency_p50_ms": c.p50_ms,
                            "latency_p95_ms": c.p95_ms, "latency_p99_ms": c.p99_ms, "ann_recall": report.ann_recall,
                            **{f"drift_{k}": v for k, v in report.drift.items() if np.isfinite(v)}})


def summary(report: MonitorReport) -> dict:
    return {**{k: v for k, v in asdict(report.canary).items() if k != "per_query"}, "drift": report.drift, "ann_recall": report.ann_recall,
            "quality_drop": report.quality_drop, "new_drop": report.new_drop, "drifted": report.drifted,
            "reason": report.reason}
