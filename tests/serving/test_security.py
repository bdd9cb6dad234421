"""Hardening that needs no running service: tokens, Host checks, model URIs, the API's change log, what the
service ships to the Extractor, the retrain lock and the once-per-drop trigger."""
import io
import os
import stat
import threading
import time

import numpy as np
import pytest
from PIL import Image

from data.errors import IlrError


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("ILR_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ILR_API_TOKEN", raising=False)
    monkeypatch.delenv("ILR_URL", raising=False)
    return tmp_path / "home"


def test_workspace_is_private_and_a_blank_token_is_never_used(home, monkeypatch):
    from data.config import ilr_home
    from serving.config import api_token

    assert stat.S_IMODE(ilr_home().stat().st_mode) == 0o700
    (home / "api-token").write_text("  \n")  # a crash or a full disk right after creating the file
    token = api_token()
    assert len(token) >= 16 and (home / "api-token").read_text().strip() == token
    assert stat.S_IMODE((home / "api-token").stat().st_mode) == 0o600
    assert api_token() == token  # generated once
    for bad in ("", "   ", "short", "\u00a0" * 20, "has a space in it, long enough"):
        monkeypatch.setenv("ILR_API_TOKEN", bad)
        with pytest.raises(IlrError, match="API token"):
            api_token()


def test_bearer_and_host_checks():
    from serving.http import bearer_ok, host_allowed
    from serving.config import ServeConfig

    token = "t" * 20
    assert bearer_ok(f"Bearer {token}", token) and bearer_ok(f"bearer  {token}", token)
    for header in ("", "Bearer", "Bearer ", "Bearer \u00a0", f"Basic {token}", "Bearer é" + token,
                   f"Bearer {token}\u00a0x"):
        assert not bearer_ok(header, token), header
    assert not bearer_ok("Bearer ", "")  # an empty token never matches
    loop = ServeConfig()
    for ok in ("127.0.0.1:8000", "localhost", "LOCALHOST:8000", "[::1]:8000"):
        assert host_allowed(ok, loop), ok
    for bad in ("attacker.example", "attacker.example:8000", "127.0.0.1.nip.io", ""):
        assert not host_allowed(bad, loop), bad
    assert host_allowed("search.example.org", ServeConfig(allowed_hosts=("search.example.org",)))
    assert host_allowed("anything", ServeConfig(host="0.0.0.0"))


def test_models_come_only_from_this_workspace():
    from models.registry import check_model_uri

    for ok in ("models:/ilr-delg/3", "models:/ilr-delg@champion", "runs:/abc/model", "some/local/folder"):
        assert check_model_uri(ok) == ok
    for bad in ("http://evil.example/w.pt", "s3://bucket/model", "models://other-server/ilr-delg/1",
                "file:///etc/passwd", "dbfs:/x"):
        with pytest.raises(IlrError, match="only this workspace"):
            check_model_uri(bad)


def test_the_token_goes_only_to_the_configured_service(home, monkeypatch):
    from serving.client import Client

    assert Client("http://127.0.0.1:8000")._auth()["Authorization"].startswith("Bearer ")
    assert Client("http://localhost:8000/")._auth()
    with pytest.raises(IlrError, match="not sending"):
        Client("http://attacker.example:8000")._auth()
    monkeypatch.setenv("ILR_URL", "https://search.example.org")
    assert Client("https://search.example.org")._auth()
    assert Client("http://attacker.example", token="explicit-token-123456")._auth()  # the caller's own choice


def test_change_log_is_write_ahead_and_idempotent(home):
    from serving.changes import ChangeLog, Conflict

    log = ChangeLog("photos")
    first, new = log.record_add("a", "lab", "artwork", b"bytes-1")
    assert new and log.blob(first) == b"bytes-1"
    again, new = log.record_add("a", "lab", "artwork", b"bytes-1")  # a retried request
    assert not new and again == first
    with pytest.raises(Conflict):
        log.record_add("a", "lab", "artwork", b"other bytes")
    log.record_delete("a")
    log.record_delete("gone")
    replaced, new = log.record_add("a", "lab2", "artwork", b"other bytes")  # DELETE then add replaces
    assert new
    log.close()
    state = ChangeLog("photos").state()  # durable: another process (a build) reads the same log
    assert {k: v.op for k, v in state.items()} == {"gone": "delete", "a": "add"} and state["a"].label == "lab2"
    with pytest.raises(IlrError):
        ChangeLog("../escape")


def test_queries_are_shipped_at_about_the_extractors_size():
    from data.images import decode_scaled

    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (1500, 4000, 3), np.uint8)).save(buf, fmt)
        arr, size = decode_scaled(buf.getvalue(), "q", max_side=384)
        assert size == (4000, 1500) and max(arr.shape[:2]) < 2 * 384 and max(arr.shape[:2]) >= 384, (fmt, arr.shape)
    small = io.BytesIO()
    Image.new("RGB", (300, 200)).save(small, "PNG")
    arr, size = decode_scaled(small.getvalue(), "q", max_side=384)
    assert arr.shape == (200, 300, 3) and size == (300, 200)


def test_two_retrains_at_once_run_one_after_the_other(home):
    from flows.lifecycle import RetrainRunning, retrain_lock

    spans, started = [], threading.Barrier(2)

    def retrain():
        started.wait()
        with retrain_lock():
            t = time.monotonic()
            time.sleep(0.3)
            spans.append((t, time.monotonic()))

    threads = [threading.Thread(target=retrain) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    (a0, a1), (b0, b1) = sorted(spans)
    assert len(spans) == 2 and b0 >= a1  # the second waited for the first
    with retrain_lock(), pytest.raises(RetrainRunning):
        with retrain_lock(wait=False):
            pass


def test_quality_trigger_fires_once_per_drop(home):
    from monitoring.monitor import record_quality
    from monitoring.store import MonitorStore

    store = MonitorStore(home / "m.db")
    assert record_quality(store, "m1", "c1", "mAP low")
    assert not record_quality(store, "m1", "c1", "mAP low")  # the same drop, next pass: no new trigger
    assert not record_quality(store, "m1", "c1", "")  # recovered
    assert record_quality(store, "m1", "c1", "mAP low")  # a new drop
    assert record_quality(store, "m2", "c2", "mAP low")  # another model went live and is low too
    kinds = [r["kind"] for r in store.rows("events")]
    assert kinds == ["quality_drop", "quality_drop", "quality_ok", "quality_drop", "quality_drop"]
    store.close()
    assert os.path.exists(home / "m.db")
