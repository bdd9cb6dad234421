"""Monitoring maths, the SQLite store and the dashboard page (rendered without Serve)."""
import re
import time

import numpy as np

from monitoring.dashboard import render, svg_plot
from monitoring.monitor import drift, mmd_rbf
from monitoring.store import MonitorStore


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_mmd_separates_shifted_distributions():
    rng = np.random.default_rng(0)
    a, b = _unit(rng.normal(size=(200, 16))), _unit(rng.normal(size=(200, 16)))
    shifted = _unit(rng.normal(size=(200, 16)) + 1.5)
    same, moved = mmd_rbf(a, b), mmd_rbf(a, shifted)
    assert abs(same) < 0.02 and moved > 0.1
    d = drift(shifted, a)
    assert d["centroid_shift"] > 0.5 and d["queries"] == 200
    assert np.isnan(drift(np.zeros((0, 16)), a)["mmd"])


def test_store_and_dashboard_render(tmp_path):
    store = MonitorStore(tmp_path / "m.db")
    t = time.time()
    for i, model in enumerate(["models:/ilr-delg/1", "models:/ilr-delg/1", "models:/ilr-delg/2"]):
        store.add("canary", ts=t + i, model=model, idx="c", dataset="d@v1", queries=8, map_at_k=0.7 + 0.1 * i,
                  recall_at_k=0.9, top1=0.8, errors=0, p50_ms=400 + i, p95_ms=600, p99_ms=900, stages={"extract_ms": 1})
        store.add("drift", ts=t + i, model=model, idx="c", queries=8, mmd=0.01 * i, centroid_shift=0.1,
                  query_top1_sim=0.8, index_top1_sim=0.7)
        store.add("ann", ts=t + i, idx="c", recall=0.99, k=100, queries=100)
    store.add("events", kind="ilr.quality.dropped", reason="mAP <b>low</b>", detail={"x": 1})
    for i, (champion, served) in enumerate([("1", 0.98), ("2", 0.99)]):
        for dataset in ("synthetic-small@v1", "real-photos@v1"):
            store.add("gate", ts=t + i, dataset=dataset, champion=champion, served=served, global_map=0.9,
                      challenger="2", challenger_served=0.99, decision="promoted" if i else "rejected")
    html = render(store, {"status": "ok", "model": "models:/ilr-delg/2", "index": "c", "dataset": "d@v1",
                          "images": 20, "champion": "models:/ilr-delg/2"}, {"search 200": 12})
    points = dict(re.findall(r'id="(plot-[a-z]+)" data-points="(\d+)"', html))
    assert points == {"plot-quality": "6", "plot-latency": "9", "plot-drift": "6", "plot-ann": "3",
                      "plot-suites": "4"}
    assert html.count("<polyline") == 4 + 3 + 2 + 1 + 2  # quality: mAP + recall per model version; a line per suite
    assert "real-photos@v1 (champion)" in html
    assert "mAP &lt;b&gt;low&lt;/b&gt;" in html  # escaped
    assert "no data yet" in svg_plot("t", {}, "y", "p")
