"""The monitoring dashboard: one HTML page (server-rendered SVG plots, no scripts, no CDN) at /dashboard.

Lines over time, with promotions and index swaps marked on every time axis: canary quality (mAP@k,
recall@k, top-1), mAP@k per domain, served mAP per golden suite, latency per stage and percentiles, query
drift, ANN recall; the last canary's worst queries as thumbnails (query, expected, ranked first); the model
and index live now, the service's request counters and the events. Served as its
own Ray Serve application beside the retrieval graph (same HTTP port); `render()` also works without Serve.
"""
import base64
import html
import json
import time

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from ray import serve

from data.config import apply_worker_env
from monitoring.config import monitor_config
from monitoring.store import MonitorStore

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


MARKER_COLORS = {"promotion": "#7b3fa0", "index swap": "#666"}


def svg_plot(title: str, series: dict[str, list[tuple[float, float]]], y_label: str, plot_id: str,
             y_range: tuple[float, float] | None = None, width: int = 560, height: int = 240,
             markers: list[tuple[float, str, str]] = ()) -> str:
    """A line chart of {name: [(t, y), ...]}: each series a polyline with circles at its points; markers
    [(t, kind, text)] (promotions, index swaps) are dashed vertical lines on the time axis."""
    pts = [(t, y) for s in series.values() for t, y in s if y == y]  # drop NaN
    n = len(pts)
    ml, mr, mt, mb = 60, 30, 28, 46
    if n:  # markers from a little before the data's first point (the swap that started it) on
        lo, hi = min(p[0] for p in pts), max(p[0] for p in pts)
        markers = [m for m in markers if lo - 0.1 * max(hi - lo, 60) <= m[0]]
    else:
        markers = []
    out = [f'<svg class="plot" id="{plot_id}" data-points="{n}" data-markers="{len(markers)}" width="{width}" '
           f'height="{height}" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg" role="img">',
           f'<text x="{width / 2}" y="17" text-anchor="middle" class="title">{html.escape(title)}</text>']
    if not n:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="empty">no data yet</text></svg>')
        return "".join(out)
    t0, t1 = min([p[0] for p in pts] + [m[0] for m in markers]), max([p[0] for p in pts] + [m[0] for m in markers])
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
    fmt = "%H:%M:%S" if t1 - t0 < 20 * 3600 else "%m-%d %H:%M"
    for t, anchor in ((t0, "start"), ((t0 + t1) / 2, "middle"), (t1, "end")):
        out.append(f'<text x="{sx(t):.1f}" y="{height - mb + 15}" text-anchor="{anchor}" class="tick">'
                   f'{time.strftime(fmt, time.localtime(t))}</text>')
    for t, kind, text in markers:
        c = MARKER_COLORS.get(kind, "#999")
        out.append(f'<line class="marker" data-kind="{html.escape(kind)}" x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{mt}" '
                   f'y2="{height - mb}" stroke="{c}" stroke-dasharray="4 3"><title>{html.escape(text)}</title></line>'
                   f'<text x="{sx(t) + 3:.1f}" y="{mt + 10}" class="mlabel" fill="{c}">{html.escape(text[:24])}</text>')
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
    for kind in dict.fromkeys(k for _, k, _ in markers):
        out.append(f'<line x1="{lx}" x2="{lx + 10}" y1="{height - 13}" y2="{height - 13}" stroke="{MARKER_COLORS.get(kind, "#999")}" '
                   f'stroke-dasharray="3 2" stroke-width="2"/><text x="{lx + 14}" y="{height - 9}" class="legend">{kind}</text>')
        lx += 24 + 7 * len(kind)
    out.append("</svg>")
    return "".join(out)


def _from_zero(series: dict) -> tuple[float, float] | None:
    ys = [y for s in series.values() for _, y in s if y == y]
    return (0.0, max(ys) * 1.1) if ys and max(ys) > 0 else None


def markers(gate: list[dict], events: list[dict]) -> list[tuple[float, str, str]]:
    """(t, kind, text) of each promotion (gate decisions, manual promotions and rollbacks) and index swap."""
    out, seen = [], set()
    for r in gate:
        if r["decision"] == "promoted" and r["challenger"] not in seen:
            seen.add(r["challenger"])
            out.append((r["ts"], "promotion", f"promoted v{r['challenger']}"))
    for e in events:
        if e["kind"] == "promotion":
            out.append((e["ts"], "promotion", f"champion v{json.loads(e['detail'] or '{}').get('champion')}"))
        elif e["kind"] == "index_swap":
            name = json.loads(e["detail"] or "{}").get("collection") or "?"
            out.append((e["ts"], "index swap", f"index {name.removeprefix('ilr_')}"))
    return sorted(out)


def _per_domain(store: MonitorStore) -> dict[str, list[tuple[float, float]]]:
    """mAP@k per domain per canary pass (the mean of its queries' AP@k), aggregated by SQLite."""
    series: dict[str, list] = {}
    last: dict[str, int] = {}
    for ts, domain, ap, n in store.domain_quality():
        series.setdefault(domain, []).append((ts, float(ap)))
        last[domain] = n
    return {f"{d} ({last[d]} q)": s for d, s in series.items()}  # with the last pass's number of queries


def _per_stage(canary: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """The canary's median time per stage of the service (decode, extract, search, re-rank, ...)."""
    series: dict[str, list] = {}
    for r in canary:
        for stage, ms in json.loads(r["stages"] or "{}").items():
            series.setdefault(stage.removesuffix("_ms"), []).append((r["ts"], ms))
    return series


def _img(jpeg: bytes | None, alt: str) -> str:
    if not jpeg:
        return "<div class='noimg'>no image</div>"
    return f'<img src="data:image/jpeg;base64,{base64.b64encode(jpeg).decode()}" alt="{html.escape(alt)}">'


def worst_queries(store: MonitorStore, canary: list[dict]) -> str:
    """The latest canary's worst queries: the query, an image of its instance, and what came first."""
    if not canary:
        return "<p>no canary yet</p>"
    ts = canary[-1]["ts"]
    rows = [r for r in store.rows("canary_queries", since=ts) if r["ts"] == ts]
    if not rows:
        return "<p>the last canary recorded no per-query results</p>"
    bad = sorted((r for r in rows if r["ap"] < 1), key=lambda r: (r["ap"], r["query_id"]))
    if not bad:
        return f"<p>all {len(rows)} queries of the last canary found their instance first (AP@k 1.0)</p>"
    thumbs = {t["query_id"]: t for t in store.rows("canary_thumbs", since=ts) if t["ts"] == ts}
    lines = []
    for r in bad[:monitor_config().worst_queries]:
        t = thumbs.get(r["query_id"], {})
        first_ok = r["first_label"] == r["label"]
        lines.append(
            f"<tr class='wq'><td>{r['ap']:.3f}</td>"
            f"<td>{_img(t.get('query_jpeg'), 'query')}<div>{html.escape(r['query_id'])}<br>"
            f"{html.escape(str(r['label']))} · {html.escape(str(r['domain']))}</div></td>"
            f"<td>{_img(t.get('expected_jpeg'), 'expected')}<div>{html.escape(str(r['expected_id']))}</div></td>"
            f"<td>{_img(t.get('first_jpeg'), 'first result')}<div class='{'ok' if first_ok else 'warn'}'>"
            f"{html.escape(str(r['first_id']))}<br>{html.escape(str(r['first_label']))}</div></td></tr>")
    return (f"<p>{len(bad)} of {len(rows)} queries below AP@k 1.0 in the canary of "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ts))}; the worst:</p><table class='worst'>"
            "<tr><th>AP@k</th><th>query</th><th>expected (its instance)</th><th>ranked first</th></tr>"
            + "".join(lines) + "</table>")


def render(store: MonitorStore, health: dict | None = None, metrics: dict | None = None) -> str:
    canary, drift, ann = store.rows("canary"), store.rows("drift"), store.rows("ann")
    events, gate = store.rows("events"), store.rows("gate")
    marks = markers(gate, events)
    quality = {name: [(r["ts"], r[col]) for r in canary if r["queries"]]
               for name, col in (("mAP@k", "map_at_k"), ("recall@k", "recall_at_k"), ("top-1", "top1"))}
    latency = {f"{p}": [(r["ts"], r[f"{p}_ms"]) for r in canary if r[f"{p}_ms"] is not None] for p in ("p50", "p95", "p99")}
    stages = _per_stage(canary)
    drift_s = {"MMD^2": [(r["ts"], r["mmd"]) for r in drift if r["mmd"] is not None],
               "centroid shift": [(r["ts"], r["centroid_shift"]) for r in drift if r["centroid_shift"] is not None]}
    ann_s = {"ANN recall": [(r["ts"], r["recall"]) for r in ann]}
    suites: dict[str, list] = {}
    for r in store.rows("suites"):  # the live model on the golden suites, each monitoring pass
        suites.setdefault(f"{r['dataset']} (live)", []).append((r["ts"], r["served"]))
    for r in gate:  # the champion's served mAP per dataset after each gate decision
        suites.setdefault(f"{r['dataset']} (gate)", []).append((r["ts"], r["served"]))
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
                 f"</td><td>{html.escape(e['reason'] or '')}</td></tr>" for e in reversed(events[-12:])) or \
        "<tr><td colspan=3>none</td></tr>"
    plots = "".join([
        svg_plot("Retrieval quality (canary on the live dataset)", quality, "score", "plot-quality", (0, 1),
                 markers=marks),
        svg_plot("mAP@k per domain (canary)", _per_domain(store), "mAP@k", "plot-domains",
                 (0, 1), markers=marks),
        svg_plot("Served mAP per golden suite (live: each pass; gate: the champion)",
                 suites, "mAP", "plot-suites", (0, 1), markers=marks),
        svg_plot("Latency per stage (canary medians, ms)", stages, "ms", "plot-stages", _from_zero(stages),
                 markers=marks),
        svg_plot("Latency percentiles (canary, client side, ms)", latency, "ms", "plot-latency", _from_zero(latency),
                 markers=marks),
        svg_plot("Query drift vs the index", drift_s, "score", "plot-drift", _from_zero(drift_s), markers=marks),
        svg_plot("ANN recall vs exact search", ann_s, "recall", "plot-ann", (0, 1), markers=marks)])
    return f"""<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="30">
<title>ilr monitoring</title><style>
body{{font-family:system-ui,sans-serif;margin:20px;color:#222}} h1{{font-size:20px}} .live{{margin:8px 0 14px}}
h2{{font-size:15px;margin-top:22px}}
.cards{{display:flex;gap:10px;flex-wrap:wrap}} .card{{border:1px solid #ddd;border-radius:6px;padding:8px 14px}}
.card .v{{font-size:20px;font-weight:600}} .card .k{{font-size:12px;color:#666}}
.grid2{{display:grid;grid-template-columns:repeat(auto-fill,minmax(570px,1fr));gap:12px;margin-top:14px}}
svg .title{{font-size:13px;font-weight:600}} svg .tick,svg .legend{{font-size:10px;fill:#555}} svg .empty{{fill:#999}}
svg .mlabel{{font-size:9px}} svg .frame{{fill:none;stroke:#ccc}} svg .grid{{stroke:#eee}} .warn{{color:#b00;font-weight:600}}
.ok{{color:#2a7}} table{{border-collapse:collapse;font-size:13px}} td,th{{border-top:1px solid #eee;padding:3px 8px;text-align:left}}
.worst td{{vertical-align:top}} .worst img{{max-height:96px;display:block}} .worst div{{font-size:11px;max-width:190px;overflow-wrap:anywhere}}
.noimg{{width:96px;height:64px;background:#f3f3f3;color:#999;font-size:11px}}
</style></head><body><h1>ilr — retrieval monitoring</h1>
<div class="live">{live}</div><div class="cards">{cards}</div>
<div class="grid2">{plots}</div>
<h2>Worst queries of the last canary</h2>{worst_queries(store, canary)}
<h2>Service counters (/metrics)</h2><div style="font-size:13px">{counters}</div>
<h2>Events (retrain triggers, promotions, index swaps, monitor errors)</h2><table>{ev}</table>
<p style="font-size:12px;color:#777">generated {time.strftime('%Y-%m-%d %H:%M:%S')} · refreshes every 30 s ·
dashed lines: promotions (purple) and index swaps (grey) · data in $ILR_HOME/{html.escape(store.path.name)}</p></body></html>"""


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
