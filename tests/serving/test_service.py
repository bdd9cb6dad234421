"""The Ray Serve retrieval graph on a real local Ray, a real Milvus Lite server and a real MLflow registry."""
import base64
import io
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from data import manifest
from data.config import NO_LABEL
from data.versioning import dataset_dir

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_template):
    """tiny ingested and indexed (off-the-shelf model), the service running on a free loopback port."""
    from ray import serve

    from serving import milvus_server, service
    from serving.config import serve_config
    from serving.index import build

    from tests.conftest import copy_workspace, workspace_env

    root = tmp_path_factory.mktemp("svc")
    copy_workspace(tiny_template, root)
    saved = {k: os.environ.get(k) for k in ("ILR_REPO", "ILR_HOME", "ILR_PARAMS", "MLFLOW_TRACKING_URI", "ILR_API_TOKEN")}
    os.environ.update(**workspace_env(root), ILR_API_TOKEN="test-token-0123456789")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    milvus_server.ensure()
    build("tiny", log_fn=lambda *_: None, engine="local")
    cfg = serve_config(port=_free_port(), max_body_mb=2.0)
    from monitoring.dashboard import build_dashboard

    url = service.start(cfg, extra_apps=((build_dashboard(cfg), "dashboard", "/dashboard"),))
    folder = dataset_dir("tiny")[1]
    df = manifest.read(folder)
    yield {"url": url, "folder": folder, "df": df, "http": httpx.Client(base_url=url, timeout=120)}
    serve.shutdown()
    milvus_server.stop()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _queries(svc):
    df = svc["df"]
    return df[(df["split"] == "query") & (df["label"] != NO_LABEL)]


def _img_bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _assert_error(r, status):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body["error"]) == {"code", "message"} and body["error"]["message"]


def test_search_client_and_cli(service):
    from typer.testing import CliRunner

    from flows.cli import app
    from serving.client import Client

    q = _queries(service)
    client = Client(service["url"])
    top1 = []
    for _, row in q.iterrows():
        res = client.search(service["folder"] / row["path"], top_k=5)
        assert len(res["results"]) == 5 and res["model"] == "off-the-shelf" and res["index"].startswith("ilr_m")
        assert {"decode_ms", "extract_ms", "search_ms", "rerank_ms", "total_ms"} <= set(res["timings_ms"])
        assert res["results"][0]["inliers"] is not None
        top1.append(res["results"][0]["label"] == row["label"])
    assert np.mean(top1) >= 0.75
    # JSON + base64, no re-ranking
    data = (service["folder"] / q.iloc[0]["path"]).read_bytes()
    r = service["http"].post("/v1/search", json={"image_base64": base64.b64encode(data).decode(), "top_k": 3,
                                                 "rerank": False})
    assert r.status_code == 200 and len(r.json()["results"]) == 3 and r.json()["results"][0]["inliers"] is None
    rec = client.recognize(service["folder"] / q.iloc[0]["path"])
    assert rec["match"] and rec["label"] == q.iloc[0]["label"] and rec["confidence"] >= rec["threshold"]
    # a featureless image: no match
    flat = _img_bytes(Image.new("RGB", (200, 160), (128, 128, 128)), "PNG")
    assert client.recognize(flat)["match"] is False
    out = CliRunner().invoke(app, ["query", str(service["folder"] / q.iloc[0]["path"]), "--top-k", "3",
                                   "--url", service["url"]])
    assert out.exit_code == 0, out.output
    assert q.iloc[0]["label"] in out.output and "inliers" in out.output
    health = client.health()
    assert health["status"] == "ok" and health["images"] > 0
    metrics = client.metrics()
    assert 'ilr_requests_total{endpoint="search",status="200"}' in metrics and "ilr_stage_seconds" in metrics
    assert service["http"].get("/openapi.json").json()["paths"]["/v1/search"]


def test_bad_input_gets_4xx_json_and_service_keeps_serving(service):
    http = service["http"]
    good = (service["folder"] / _queries(service).iloc[0]["path"]).read_bytes()
    bomb = _img_bytes(Image.new("L", (10_000, 10_000)), "PNG")  # 100 MP, a few KB
    cases = {
        "not an image": (lambda: http.post("/v1/search", files={"image": ("x.jpg", b"hello, not an image")}), 422),
        "truncated": (lambda: http.post("/v1/search", files={"image": ("t.jpg", good[: len(good) // 3])}), 422),
        "over the size limit": (lambda: http.post("/v1/search", files={"image": ("b.jpg", b"\xff" * 3_000_000)}), 413),
        "decompression bomb": (lambda: http.post("/v1/search", files={"image": ("bomb.png", bomb)}), 413),
        "1x1 px": (lambda: http.post("/v1/search", files={"image": ("p.png", _img_bytes(Image.new("RGB", (1, 1)), "PNG"))}), 422),
        "empty body": (lambda: http.post("/v1/search", content=b"", headers={"content-type": "application/json"}), 422),
        "empty file": (lambda: http.post("/v1/search", files={"image": ("e.jpg", b"")}), 422),
        "wrong content type": (lambda: http.post("/v1/search", content=good, headers={"content-type": "image/jpeg"}), 415),
        "bad base64": (lambda: http.post("/v1/search", json={"image_base64": "***"}), 422),
        "top_k 0": (lambda: http.post("/v1/search", files={"image": ("q.jpg", good)}, data={"top_k": "0"}), 422),
        "top_k 101": (lambda: http.post("/v1/search", files={"image": ("q.jpg", good)}, data={"top_k": "101"}), 422),
        "top_k text": (lambda: http.post("/v1/search", files={"image": ("q.jpg", good)}, data={"top_k": "ten"}), 422),
        "no token": (lambda: http.post("/v1/index/images", files={"image": ("q.jpg", good)}, data={"image_id": "x1"}), 401),
        "wrong token": (lambda: http.delete("/v1/index/images/x1", headers={"Authorization": "Bearer nope"}), 401),
        "unknown path": (lambda: http.get("/v1/nothing"), 404),
    }
    for name, (call, status) in cases.items():
        r = call()
        assert r.status_code == status, f"{name}: {r.status_code} {r.text}"
        _assert_error(r, status)
    assert http.get("/healthz").json()["status"] == "ok"
    assert http.post("/v1/search", files={"image": ("q.jpg", good)}).status_code == 200


def test_image_variants_work(service):
    img = Image.open(service["folder"] / _queries(service).iloc[0]["path"]).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    variants = {
        "cmyk": _img_bytes(img.convert("CMYK"), "JPEG"),
        "16-bit": _img_bytes(Image.fromarray((np.asarray(img.convert("L")).astype(np.uint16) * 257)), "PNG"),
        "grayscale": _img_bytes(img.convert("L"), "JPEG"),
        "palette": _img_bytes(img.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "exif rotated": _img_bytes(img.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif),
        "rgba webp": _img_bytes(img.convert("RGBA"), "WEBP"),
    }
    for name, data in variants.items():
        r = service["http"].post("/v1/search", files={"image": (name, data)}, data={"top_k": "3"})
        assert r.status_code == 200, f"{name}: {r.text}"


def test_index_add_delete_with_token(service):
    from serving.client import Client, ServiceError

    client = Client(service["url"], token="test-token-0123456789")
    q = _queries(service).iloc[1]
    before = client.health()["images"]
    added = client.add(service["folder"] / q["path"], "new-photo-1", label="my-label", domain="artwork")
    assert added["image_id"] == "new-photo-1"
    time.sleep(1.2)  # health is re-read every poll_s
    assert client.health()["images"] == before + 1
    res = client.search(service["folder"] / q["path"], top_k=3)
    assert res["results"][0]["image_id"] == "new-photo-1" and res["results"][0]["label"] == "my-label"
    with pytest.raises(ServiceError) as dup:
        client.add(service["folder"] / q["path"], "new-photo-1")
    assert dup.value.status == 409
    for bad in ("../etc/passwd", "a/b", ".hidden", "x" * 300):
        r = service["http"].post("/v1/index/images", files={"image": ("q.jpg", b"x")}, data={"image_id": bad},
                                 headers={"Authorization": "Bearer test-token-0123456789"})
        assert r.status_code == 422, (bad, r.text)
    assert client.delete("new-photo-1")["deleted"] == "new-photo-1"
    with pytest.raises(ServiceError) as missing:
        client.delete("new-photo-1")
    assert missing.value.status == 404
    res = client.search(service["folder"] / q["path"], top_k=3)
    assert "new-photo-1" not in {r["image_id"] for r in res["results"]}


@pytest.mark.e2e
def test_promotion_and_index_swap_under_load_lose_no_request(service):
    """A new champion is registered and promoted, its index is built and the alias swapped while clients
    keep querying: every request succeeds and answers switch to the new model."""
    import mlflow

    from models import registry, tracking
    from models.artifacts import off_the_shelf
    from serving.index import build

    data = (service["folder"] / _queries(service).iloc[0]["path"]).read_bytes()
    results, stop = [], threading.Event()

    def load():
        with httpx.Client(base_url=service["url"], timeout=60) as http:
            for _ in range(400):  # bounded in count and in time
                if stop.is_set():
                    break
                r = http.post("/v1/search", files={"image": ("q.jpg", data)}, data={"top_k": "5"})
                results.append((r.status_code, r.json().get("model")))

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        tracking.setup("tests")
        with mlflow.start_run():
            info = registry.log_model(off_the_shelf(), tracking.ilr_home() / "m" / "v")
        version = registry.register(info.model_uri, {"kind": "copy"})
        registry.promote(version)
        assert registry.alias_version("champion") == version
        res = build("tiny", log_fn=lambda *_: None, engine="local")
        assert res.alias_moved and res.model.endswith(f"/{version}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(m and m.endswith(f"/{version}") for _, m in results[-3:]):
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    statuses = [s for s, _ in results]
    assert statuses and all(s == 200 for s in statuses), statuses
    models = [m for _, m in results]
    assert models[0] == "off-the-shelf" and models[-1].endswith(f"/{version}")
    health = httpx.get(f"{service['url']}/healthz").json()
    assert health["champion_pending_index"] is False


def test_bad_requests_get_4xx_not_500(service):
    http, token = service["http"], "test-token-0123456789"
    img = _img_bytes(Image.new("RGB", (64, 64), (90, 120, 30)), "PNG")
    files = {"image": ("q.png", img)}
    # a non-ASCII bearer is a plain mismatch; a bearer of one non-breaking space does not pass either
    for auth in ("Bearer é".encode(), "Bearer \u00a0".encode(), b"Bearer", f"Bearer {token}x".encode()):
        r = http.post("/v1/index/images", files=files, data={"image_id": "x1"}, headers={"Authorization": auth})
        _assert_error(r, 401)
    r = http.post("/v1/search", content=b"[" * 100_000, headers={"content-type": "application/json"})
    _assert_error(r, 400)  # nested too deeply: before, RecursionError -> 500
    # DNS rebinding: a page whose name resolves to 127.0.0.1 sends its own Host
    r = http.get("/healthz", headers={"host": "attacker.example"})
    _assert_error(r, 421)
    assert http.get("/healthz", headers={"host": "localhost:1234"}).status_code == 200
    r = http.get("/v1/monitoring/embeddings", params={"n": 10**9}, headers={"Authorization": f"Bearer {token}"})
    _assert_error(r, 422)
    r = http.get("/healthz")
    assert r.headers["x-content-type-options"] == "nosniff"


def test_matches_thumbnails_and_the_picture(service, tmp_path):
    """return_matches gives the verified correspondences of the first results in original-image pixels; the
    index keeps thumbnails (built and added images); `ilr query --show` draws them."""
    from typer.testing import CliRunner

    from flows.cli import app
    from serving.client import Client

    client = Client(service["url"], token="test-token-0123456789")
    q = _queries(service).iloc[0]
    path = service["folder"] / q["path"]
    plain = client.search(path, top_k=5)
    res = client.search(path, top_k=5, return_matches=True)
    assert [r["image_id"] for r in res["results"]] == [r["image_id"] for r in plain["results"]]
    assert "matches" not in plain["results"][0]
    top = res["results"][0]
    qw, qh = res["query_size"]
    w, h = top["size"]
    assert len(top["matches"]["inliers"]) == top["inliers"] > 0
    pts = np.array(top["matches"]["inliers"] + top["matches"]["outliers"])
    assert (pts[:, 0] <= qw + 1).all() and (pts[:, 1] <= qh + 1).all() and (pts[:, 2] <= w + 1).all() \
        and (pts[:, 3] <= h + 1).all()
    thumb = service["http"].get(f"/v1/index/images/{top['image_id']}/thumbnail")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 256
    _assert_error(service["http"].get("/v1/index/images/nope-not-there/thumbnail"), 404)
    _assert_error(service["http"].get("/v1/index/images/.hidden/thumbnail"), 422)
    client.add(path, "thumb-added-1", label="t")
    try:
        assert client.thumbnail("thumb-added-1")  # an image added through the API gets one too
    finally:
        client.delete("thumb-added-1")
    out = tmp_path / "matches.png"
    r = CliRunner().invoke(app, ["query", str(path), "--top-k", "3", "--url", service["url"], "--show", str(out)])
    assert r.exit_code == 0, r.output
    picture = Image.open(out)
    assert picture.format == "PNG" and picture.height > 3 * 200
    green = np.all(np.asarray(picture.convert("RGB")) == (40, 200, 90), axis=2).sum()
    assert green > 50  # the inlier lines are drawn


def test_search_with_an_index_image_as_the_query(service):
    """image_id instead of an image: the index image's stored features are the query, it is left out of its
    own results, and its views come first; the page's examples come from GET /v1/index/images."""
    http = service["http"]
    listed = http.get("/v1/index/images", params={"limit": 5}).json()
    assert len(listed["images"]) == 5 and {"image_id", "label", "domain"} <= set(listed["images"][0])
    df = service["df"]
    index = df[(df["split"] == "index") & (df["label"] != NO_LABEL)]
    example = index[index["label"].duplicated(keep=False)].iloc[0]
    res = http.post("/v1/search", json={"image_id": example["image_id"], "top_k": 5, "return_matches": True})
    assert res.status_code == 200, res.text
    body = res.json()
    assert example["image_id"] not in [r["image_id"] for r in body["results"]]
    assert body["results"][0]["label"] == example["label"] and body["results"][0]["inliers"] > 0
    assert "lookup_ms" in body["timings_ms"] and "extract_ms" not in body["timings_ms"]
    assert len(body["results"][0]["matches"]["inliers"]) == body["results"][0]["inliers"]
    form = http.post("/v1/search", data={"image_id": example["image_id"], "rerank": "false"})
    assert form.status_code == 200 and form.json()["results"][0]["inliers"] is None
    assert http.post(f"/v1/search?image_id={example['image_id']}").status_code == 200
    _assert_error(http.post("/v1/search", json={"image_id": "nope-not-there"}), 404)
    _assert_error(http.post("/v1/search", json={"image_id": "../etc/passwd"}), 422)
    _assert_error(http.post("/v1/search", json={"image_id": ["a"]}), 422)
    both = http.post("/v1/search", data={"image_id": example["image_id"]},
                     files={"image": ("q.jpg", (service["folder"] / example["path"]).read_bytes(), "image/jpeg")})
    _assert_error(both, 422)
    _assert_error(http.get("/v1/index/images", params={"limit": 0}), 422)
    # adding an image still needs its bytes: image_id is its name there, not a query
    _assert_error(http.post("/v1/index/images", data={"image_id": "x-1"},
                            headers={"Authorization": "Bearer test-token-0123456789"}), 422)


def test_labels_are_printed_as_text_not_markup(service):
    from typer.testing import CliRunner

    from flows.cli import app
    from serving.client import Client

    client = Client(service["url"], token="test-token-0123456789")
    path = service["folder"] / _queries(service).iloc[3]["path"]
    client.add(path, "markup-1", label="[/]x[bold red]")  # "[/]" crashed `ilr query` (Rich markup)
    try:
        out = CliRunner().invoke(app, ["query", str(path), "--top-k", "3", "--url", service["url"]])
        assert out.exit_code == 0, out.output
        assert "[/]x[bold red]" in out.output
    finally:
        client.delete("markup-1")


def test_api_changes_survive_a_new_champion_and_a_swap(service):
    """Add and delete through the API, then a new champion's collection is built and swapped in while more
    images are added: the added images are in the new collection, the deleted one is not."""
    import mlflow

    from models import registry, tracking
    from models.artifacts import off_the_shelf
    from serving.client import Client
    from serving.index import build
    from serving.store import LocalFeatureStore, store_dir

    client = Client(service["url"], token="test-token-0123456789")
    df, folder = service["df"], service["folder"]
    q = _queries(service).iloc[2]
    gone = df[df["split"] == "index"].iloc[0]["image_id"]
    client.add(folder / q["path"], "api-added-1", label="api-label", domain="artwork")
    again = service["http"].post("/v1/index/images", files={"image": ("q", (folder / q["path"]).read_bytes())},
                                 data={"image_id": "api-added-1", "label": "api-label", "domain": "artwork"},
                                 headers={"Authorization": "Bearer test-token-0123456789"})
    assert again.status_code == 200, again.text  # a retried add is acknowledged, not duplicated
    assert client.delete(gone)["deleted"] == gone
    tracking.setup("tests")
    with mlflow.start_run():
        info = registry.log_model(off_the_shelf(), tracking.ilr_home() / "m" / "api-changes")
    registry.promote(registry.register(info.model_uri, {"kind": "copy"}))
    added, failures, building = [], [], threading.Event()
    building.set()

    def add_during_build():
        i = 0
        while building.is_set() and i < 40:  # bounded
            try:
                client.add(folder / q["path"], f"during-swap-{i}", label="swap")
                added.append(f"during-swap-{i}")
            except Exception as e:  # noqa: BLE001 - collected and asserted
                failures.append(repr(e))
            i += 1

    adder = threading.Thread(target=add_during_build)
    adder.start()
    try:
        res = build("tiny", log_fn=lambda *_: None, engine="local")
    finally:
        time.sleep(1.5)  # a few adds after the swap too
        building.clear()
        adder.join(timeout=120)
    assert res.alias_moved and not failures, failures
    store = LocalFeatureStore(store_dir(res.collection))
    ids = set(store.ids())
    store.close()
    assert "api-added-1" in ids and gone not in ids
    assert added and set(added) <= ids, sorted(set(added) - ids)
    deadline = time.monotonic() + 30
    while client.health()["index"] != res.collection and time.monotonic() < deadline:
        time.sleep(0.5)
    hits = client.search(folder / q["path"], top_k=50)["results"]
    assert hits[0]["label"] in ("api-label", "swap") and gone not in {h["image_id"] for h in hits}


def test_search_page_in_a_real_browser(service, tmp_path):
    """Headless Chromium drives /ui: choose a photo, see thumbnails and the drawn correspondences; a
    non-image shows the API's own message. Screenshots go to test-artifacts/ for a person to look at."""
    from tests.serving.cdp import Browser

    shots = Path(__file__).resolve().parents[2] / "test-artifacts"
    page = service["http"].get("/ui")
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    script = service["http"].get("/ui/app.js").text
    assert "test-token-0123456789" not in page.text + script and "cdn" not in (page.text + script).lower()
    query = service["folder"] / _queries(service).iloc[0]["path"]
    browser = Browser(tmp_path / "profile")
    try:
        browser.goto(f"{service['url']}/ui")
        browser.upload("#file", query)
        n = browser.wait_for("document.querySelectorAll('#results button').length")
        assert n == 10
        drawn = browser.wait_for("Number(document.getElementById('canvas').dataset.drawn || 0)")
        assert drawn > 0
        browser.wait_for("[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
        browser.screenshot(shots / "search-page.png")
        n = browser.wait_for("document.querySelectorAll('#examples img').length")
        assert n == 12
        browser.eval("document.querySelector('#examples button').click()")
        browser.wait_for("document.querySelector('#examples button.sel') && "
                         "document.getElementById('drop').textContent.startsWith('example')")
        drawn = browser.wait_for("document.querySelectorAll('#results button').length === 10 && "
                                 "Number(document.getElementById('canvas').dataset.drawn || 0)")
        assert drawn > 0
        browser.screenshot(shots / "search-page-example.png")
        bad = tmp_path / "not-an-image.jpg"
        bad.write_bytes(b"this is text, not a photo")
        browser.upload("#file", bad)
        message = browser.wait_for("!document.getElementById('error').hidden && document.getElementById('error').textContent")
        assert "not an image" in message
        browser.screenshot(shots / "search-page-error.png")
        # one real monitoring pass (canary with per-query results and worst-query thumbnails), then the dashboard
        from monitoring import monitor
        from monitoring.config import monitor_config
        from monitoring.store import record_swap
        from serving.client import Client

        record_swap(service["http"].get("/healthz").json()["index"], "off-the-shelf", "tiny", True)
        report = monitor.run(Client(service["url"], token="test-token-0123456789"),
                             monitor_config(canary_queries=8, suites=False, min_map=0.0), log_mlflow=False)
        assert len(report.canary.per_query) == 8
        browser.goto(f"{service['url']}/dashboard/")
        dom = browser.eval("document.documentElement.outerHTML")
        assert 'id="plot-domains" data-points="' in dom and 'data-markers="1"' in dom
        bad = [q for q in report.canary.per_query if q["ap"] < 1]
        assert dom.count("class=\"wq\"") == min(len(bad), 6)
        if bad:
            assert "data:image/jpeg;base64," in dom
        browser.screenshot(shots / "dashboard.png")
    finally:
        browser.close()
    assert (shots / "search-page.png").stat().st_size > 10_000
