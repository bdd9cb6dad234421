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
    store.add("events", ts=t + 0.5, kind="index_swap", reason="live index -> ilr_x", detail={"collection": "ilr_x"})
    store.add("events", ts=t + 1.5, kind="promotion", reason="manual", detail={"champion": "1"})
    for i, (domain, ap) in enumerate([("landmark", 1.0), ("landmark", 0.5), ("product", 0.25)]):
        for run in range(3 if i else 2):  # a domain's query count may change between passes: still one line
            store.add("canary_queries", ts=t + run, model="m", idx="c", dataset="d@v1", query_id=f"q{i}",
                      label=f"l{i}", domain=domain, ap=ap, top1=ap == 1, first_id="x<1>", first_label="other",
                      expected_id=f"e{i}")
    from data.images import thumbnail_jpeg

    jpeg = thumbnail_jpeg(np.full((40, 60, 3), 200, np.uint8), 32)
    store.add("canary_thumbs", ts=t + 2, query_id="q2", query_jpeg=jpeg, expected_jpeg=jpeg, first_jpeg=None)
    html = render(store, {"status": "ok", "model": "models:/ilr-delg/2", "index": "c", "dataset": "d@v1",
                          "images": 20, "champion": "models:/ilr-delg/2"}, {"search 200": 12})
    points = dict(re.findall(r'id="(plot-[a-z]+)" data-points="(\d+)"', html))
    assert points == {"plot-quality": "9", "plot-domains": "6", "plot-suites": "4", "plot-stages": "3",
                      "plot-latency": "9", "plot-drift": "6", "plot-ann": "3"}
    # lines over time: one per metric, per domain, per suite (live and at the gate), per stage, per percentile
    assert html.count("<polyline") == 3 + 2 + 2 + 1 + 3 + 2 + 1
    assert "landmark (1 q)" in html and "product (1 q)" in html and "landmark (2 q)" not in html
    # a promotion at the gate, a manual one and an index swap, marked on every time axis
    marks = dict(re.findall(r'id="(plot-[a-z]+)" data-points="\d+" data-markers="(\d+)"', html))
    assert set(marks.values()) == {"3"}, marks
    assert "promoted v2" in html and "index x" in html
    # the worst queries of the last canary, worst first; thumbnails where the pass recorded them
    worst = html[html.index("Worst queries"):]
    assert worst.count("class='wq'") == 2 and "2 of 2 queries below AP@k 1.0" in worst
    assert worst.index("q2<br>") < worst.index("q1<br>")
    assert worst.count("data:image/jpeg;base64,") == 2 and "no image" in worst and "x&lt;1&gt;" in worst
    assert "real-photos@v1 (gate)" in html
    assert "mAP &lt;b&gt;low&lt;/b&gt;" in html  # escaped
    assert "no data yet" in svg_plot("t", {}, "y", "p")
    assert "no canary yet" in render(MonitorStore(tmp_path / "empty.db"))
