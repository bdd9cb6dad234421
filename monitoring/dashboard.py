"""The monitoring dashboard: one HTML page (server-rendered SVG plots, no scripts, no CDN) at /dashboard.

Plots: canary quality over time per model version, latency percentiles, query drift, ANN recall; plus
the model and index live now, the service's request counters and the retrain triggers. Served as its
own Ray Serve application beside the retrieval graph (same HTTP port); `render()` also works without Serve.
"""
import html
import time

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from ray import serve

from data.config import apply_worker_env
from monitoring.store import MonitorStore

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def svg_plot(title: str, series: dict[str, list[tuple[float, float]]], y_label: str, plot_id: str,
             y_range: tuple[float, float] | None = None, width: int = 560, height: int = 240) -> str:
    """A line chart of {name: [(t, y), ...]}; each series a polyline with circles at its points."""
    pts = [(t, y) for s in series.values() for t, y in s if y == y]  # drop NaN
    n = len(pts)
    ml, mr, mt, mb = 60, 30, 28, 46
    out = [f'<svg class="plot" id="{plot_id}" data-points="{n}" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg" role="img">',
           f'<text x="{width / 2}" y="17" text-anchor="middle" class="title">{html.escape(title)}</text>']
    if not n:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="empty">no data yet</text></svg>')
        return "".join(out)
    t0, t1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = y_range or (min(p[1] for p in pts), max(p[1] for p in pts))
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5
    if t1 - t0 < 1e-9:
        t0, t1 = t0 - 30, t1 + 30
    sx = lambda t: ml + (t - t0) / (t1 - t0) * (width - ml - mr)  # noqa: E731
    sy = lambda y: height - mb - (y - y0) / (y1 - y0) * (height - mt - mb)  # noqa: E731
    out.append(f'<rect x="{ml}" y="{mt}" width="{width - ml - mr}" height="{height - mt - mb}" class="frame"/>')
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        out.append(f'<line x1="{ml}" x2="{width - mr}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" class="grid"/>'
                   f'<text x="{ml - 4}" y="{sy(y) + 4:.1f}" text-anchor="end" class="tick">{y:.4g}</text>')
    for t, anchor in ((t0, "start"), ((t0 + t1) / 2, "middle"), (t1, "end")):
        out.append(f'<text x="{sx(t):.1f}" y="{height - mb + 15}" text-anchor="{anchor}" class="tick">'
                   f'{time.strftime("%H:%M:%S", time.localtime(t))}</text>')
    out.append(f'<text x="12" y="{(height - mb + mt) / 2}" transform="rotate(-90 12 {(height - mb + mt) / 2})" '
               f'text-anchor="middle" class="tick">{html.escape(y_label)}</text>')
    lx = ml
    for i, (name, s) in enumerate(series.items()):
        s = [(t, y) for t, y in s if y == y]
        if not s:
            continue
        c = COLORS[i % len(COLORS)]
        path = " ".join(f"{sx(t):.1f},{sy(y):.1f}" for t, y in s)
        out.append(f'<polyline class="series" data-series="{html.escape(name)}" points="{path}" fill="none" '
                   f'stroke="{c}" stroke-width="2"/>')
        out.extend(f'<circle cx="{sx(t):.1f}" cy="{sy(y):.1f}" r="3" fill="{c}"/>' for t, y in s)
        out.append(f'<rect x="{lx}" y="{height - 18}" width="10" height="10" fill="{c}"/>'
                   f'<text x="{lx + 14}" y="{height - 9}" class="legend">{html.escape(name[-40:])}</text>')
        lx += 24 + 7 * min(len(name), 40)
    out.append("</svg>")
    return "".join(out)


def _by(rows: list[dict], key: str, value: str, label=lambda r: r) -> dict[str, list]:
    series: dict[str, list] = {}
    for r in rows:
        if r.get(value) is not None:
            series.setdefault(label(r[key]) if key else value, []).append((r["ts"], float(r[value])))
    return series


def _from_zero(series: dict) -> tuple[float, float] | None:
    ys = [y for s in series.values() for _, y in s if y == y]
    return (0.0, max(ys) * 1.1) if ys and max(ys) > 0 else None


def render(store: MonitorStore, health: dict | None = None, metrics: dict | None = None) -> str:
    canary, drift, ann = store.rows("canary"), store.rows("drift"), store.rows("ann")
    events = store.rows("events")[-10:]
    short = lambda m: (m or "?").replace("models:/", "")  # noqa: E731
    quality = _by(canary, "model", "map_at_k", lambda m: f"mAP@k {short(m)}")
    for name, s in _by(canary, "model", "recall_at_k", lambda m: f"recall@k {short(m)}").items():
        quality[name] = s
    latency = {f"{p}": [(r["ts"], r[f"{p}_ms"]) for r in canary if r[f"{p}_ms"] is not None] for p in ("p50", "p95", "p99")}
    drift_s = {"MMD^2": [(r["ts"], r["mmd"]) for r in drift if r["mmd"] is not None],
               "centroid shift": [(r["ts"], r["centroid_shift"]) for r in drift if r["centroid_shift"] is not None]}
    ann_s = {"ANN recall": [(r["ts"], r["recall"]) for r in ann]}
    suites: dict[str, list] = {}
    for r in store.rows("gate"):  # the champion's served mAP per dataset after each gate decision
        suites.setdefault(f"{r['dataset']} (champion)", []).append((r["ts"], r["served"]))
    for r in store.rows("suites"):  # the live model on the golden suites, each monitoring pass
        suites.setdefault(f"{r['dataset']} (live, monitor)", []).append((r["ts"], r["served"]))
    h = health or {}
    live = (f"<b>model</b> {html.escape(str(h.get('model')))} &nbsp; <b>index</b> {html.escape(str(h.get('index')))}"
            f" &nbsp; <b>dataset</b> {html.escape(str(h.get('dataset')))} &nbsp; <b>images</b> {h.get('images')}"
            f" &nbsp; <b>champion</b> {html.escape(str(h.get('champion')))}"
            + (" &nbsp; <span class='warn'>champion not indexed yet</span>" if h.get("champion_pending_index") else "")
            if h.get("status") == "ok" else f"<span class='warn'>service: {html.escape(str(h.get('status', 'unreachable')))}</span>")
    last = canary[-1] if canary else None
    cards = ""
    if last:
        cards = "".join(f"<div class='card'><div class='v'>{v}</div><div class='k'>{k}</div></div>" for k, v in [
            ("mAP@k (last canary)", f"{last['map_at_k']:.3f}"), ("recall@k", f"{last['recall_at_k']:.3f}"),
            ("top-1", f"{last['top1']:.3f}"), ("p50 / p99 ms", f"{last['p50_ms']:.0f} / {last['p99_ms']:.0f}"),
            ("ANN recall", f"{ann[-1]['recall']:.3f}" if ann else "-"),
            ("drift MMD^2", f"{drift[-1]['mmd']:.4f}" if drift and drift[-1]["mmd"] is not None else "-")])
    m = metrics or {}
    counters = " &nbsp; ".join(f"{html.escape(k)}: {v:g}" for k, v in sorted(m.items())) or "-"
    ev = "".join(f"<tr><td>{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(e['ts']))}</td><td>{html.escape(e['kind'])}"
                 f"</td><td>{html.escape(e['reason'] or '')}</td></tr>" for e in reversed(events)) or \
        "<tr><td colspan=3>none</td></tr>"
    plots = "".join([
        svg_plot("Retrieval quality over time (canary), per model version", quality, "score", "plot-quality", (0, 1)),
        svg_plot("Latency percentiles (canary, ms)", latency, "ms", "plot-latency", _from_zero(latency)),
        svg_plot("Query drift vs the index", drift_s, "score", "plot-drift", _from_zero(drift_s)),
        svg_plot("ANN recall vs exact search", ann_s, "recall", "plot-ann", (0, 1)),
        svg_plot("Served mAP per dataset and golden suite: the champion after each gate decision, the live model "
                 "at each monitoring pass",
                 suites, "mAP", "plot-suites", (0, 1))])
    return f"""<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="30">
<title>ilr monitoring</title><style>
body{{font-family:system-ui,sans-serif;margin:20px;color:#222}} h1{{font-size:20px}} .live{{margin:8px 0 14px}}
.cards{{display:flex;gap:10px;flex-wrap:wrap}} .card{{border:1px solid #ddd;border-radius:6px;padding:8px 14px}}
.card .v{{font-size:20px;font-weight:600}} .card .k{{font-size:12px;color:#666}}
.grid2{{display:grid;grid-template-columns:repeat(auto-fill,minmax(570px,1fr));gap:12px;margin-top:14px}}
svg .title{{font-size:13px;font-weight:600}} svg .tick,svg .legend{{font-size:10px;fill:#555}} svg .empty{{fill:#999}}
svg .frame{{fill:none;stroke:#ccc}} svg .grid{{stroke:#eee}} .warn{{color:#b00;font-weight:600}}
table{{border-collapse:collapse;font-size:13px}} td{{border-top:1px solid #eee;padding:3px 8px}}
</style></head><body><h1>ilr — retrieval monitoring</h1>
<div class="live">{live}</div><div class="cards">{cards}</div>
<div class="grid2">{plots}</div>
<h2 style="font-size:15px">Service counters (/metrics)</h2><div style="font-size:13px">{counters}</div>
<h2 style="font-size:15px">Retrain triggers</h2><table>{ev}</table>
<p style="font-size:12px;color:#777">generated {time.strftime('%Y-%m-%d %H:%M:%S')} · refreshes every 30 s ·
data in $ILR_HOME/{html.escape(store.path.name)}</p></body></html>"""


def _scrape(url: str) -> tuple[dict | None, dict]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        health = httpx.get(f"{url}/healthz", timeout=5).json()
        text = httpx.get(f"{url}/metrics", timeout=5).text
    except Exception:
        return None, {}
    counters: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "ilr_requests_total":
                key = f"{s.labels['endpoint']} {s.labels['status']}"
                counters[key] = counters.get(key, 0) + s.value
            elif s.name in ("ilr_no_match_total", "ilr_index_swaps_total", "ilr_index_images"):
                counters[s.name.replace("ilr_", "")] = s.value
    return health, counters


api = FastAPI(title="ilr dashboard")


@serve.deployment(name="Dashboard", ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api)
class Dashboard:
    def __init__(self, env: dict, service_url: str):
        apply_worker_env(env)
        self.url = service_url

    @api.get("/", response_class=HTMLResponse)
    def page(self):
        health, counters = _scrape(self.url)
        store = MonitorStore()
        try:
            return HTMLResponse(render(store, health, counters))
        finally:
            store.close()


def build_dashboard(cfg):
    """The dashboard Serve app, reading $ILR_HOME/monitoring.db and the service at cfg.host:cfg.port."""
    from serving.app import current_env

    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else cfg.host
    return Dashboard.bind(current_env(), f"http://{host}:{cfg.port}")
