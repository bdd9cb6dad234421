"""ilr against servers, as a user who outgrew one machine points it at them: an MLflow tracking server
(`mlflow server`, SQLite backend, artifacts served by the server), a Prefect server (`prefect server start`)
and, with --milvus-server, the Milvus standalone of the dev extra. Every server on 127.0.0.1.

Run by test_servers.py, inside a private network namespace (`unshare -rn`) when the machine allows one: the
Milvus standalone listens on every interface, so it only runs there. WORKDIR is a workspace with `tiny@v1`
ingested and a small params.yaml; the environment names it (ILR_HOME, ILR_REPO, ILR_PARAMS).

The lifecycle through the servers: `ilr retrain` (the Prefect flows: tune -> register -> gate -> index),
`ilr serve --background`, search, add and delete through the service, then `ilr model promote` and
`ilr index build` swapping the live alias under the running service to the champion, which the service
loads from the MLflow server; the servers are asked what they hold. Prints "ok" when every check passed.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
TOKEN = "servers-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"{url}: the server exited\n{log.read_text(errors='replace')[-4000:]}"
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url} not up\n{log.read_text(errors='replace')[-4000:]}"
        time.sleep(0.5)


class Servers:
    def __init__(self, work: Path):
        self.work, self.procs, self.milvus = work, [], None

    def start(self, cmd: list[str], name: str, env: dict | None = None) -> subprocess.Popen:
        log = self.work / f"{name}.log"
        p = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
                             env=env or os.environ.copy(), cwd=self.work)
        self.procs.append(p)
        return p

    def mlflow(self) -> Callable[[], str]:
        """Starts the MLflow server; the returned call waits until it answers and gives its URI."""
        port = free_port()
        # as the README advises: without MLflow 3's GenAI job runner (7 Huey consumers), which ilr never uses
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        p = self.start([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                        "--backend-store-uri", f"sqlite:///{self.work / 'mlflow-server.db'}",
                        "--artifacts-destination", str(self.work / "mlflow-artifacts")], "mlflow-server", env)

        def ready() -> str:
            wait_http(f"http://127.0.0.1:{port}/health", p, self.work / "mlflow-server.log")
            return f"http://127.0.0.1:{port}"
        return ready

    def prefect(self) -> Callable[[], str]:
        """Starts the Prefect server; the returned call waits until it answers and gives its API URL."""
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(self.work / "prefect-server"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_UI_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING")
        p = self.start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                       "prefect-server", env)

        def ready() -> str:
            wait_http(f"http://127.0.0.1:{port}/api/health", p, self.work / "prefect-server.log")
            return f"http://127.0.0.1:{port}/api"
        return ready

    def milvus_standalone(self) -> str:
        from milvus import MilvusServer

        self.milvus = MilvusServer()
        self.milvus.set_base_dir(tempfile.mkdtemp(prefix="ilr-milvus-server-"))
        self.milvus.start()
        return f"http://127.0.0.1:{self.milvus.listen_port}"

    def stop(self) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, signal.SIGKILL)
        if self.milvus is not None:
            self.milvus.stop()


def vector_index_checks(uri: str) -> None:
    """ilr's VectorIndex on the server: insert + seal, search, recall, alias swap, delete."""
    from serving.config import IndexConfig
    from serving.vectors import VectorIndex, recall_at_k

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"img{i}" for i in range(len(x))]
    a = VectorIndex.connect("ilr_check_a", uri=uri)
    a.create(16, IndexConfig())
    a.insert([{"image_id": i, "label": f"l{n % 7}", "domain": "landmark", "vector": v.tolist()}
              for n, (i, v) in enumerate(zip(ids, x))])
    a.seal()  # flush + wait for the server's asynchronous index build + load
    assert a.count() == 300, a.count()
    hits = a.search(x[:3], 5)
    assert [h[0]["image_id"] for h in hits] == ids[:3], hits
    assert hits[1][0]["label"] == "l1" and hits[1][0]["domain"] == "landmark" and hits[1][0]["score"] > 0.99
    assert a.existing(["img5", "nope"]) == {"img5"}
    assert recall_at_k(a, ids, x, 100, 50, 128) >= 0.95
    a.point_alias("ilr_check_live")
    assert a.alias_target("ilr_check_live") == "ilr_check_a"
    b = VectorIndex.connect("ilr_check_b", uri=uri)
    b.create(16, IndexConfig())
    b.insert([{"image_id": "only", "label": "x", "domain": "artwork", "vector": x[0].tolist()}])
    b.seal()
    b.point_alias("ilr_check_live")
    live = VectorIndex.connect("ilr_check_live", uri=uri)
    assert live.alias_target("ilr_check_live") == "ilr_check_b"
    assert [h["image_id"] for h in live.search(x[:1], 5)[0]] == ["only"]
    a.delete(["img0"])
    eventually(lambda: a.search(x[:1], 5)[0][0]["image_id"] != "img0", "a deleted vector is still found")


def eventually(pred, what: str, timeout_s: float = 30) -> None:
    """A server's default consistency is bounded staleness; the service re-reads the alias every poll_s."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


def ilr(*args: str, timeout: int = 900) -> str:
    r = subprocess.run([str(BIN / "ilr"), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"ilr {' '.join(args)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout + r.stderr


def lifecycle(mlflow_uri: str, milvus_uri: str | None) -> None:
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    from data import manifest
    from serving.client import Client

    home = Path(os.environ["ILR_HOME"])
    out = ilr("retrain", "--dataset", "tiny", "--trials", "1", "--steps", "2", "--reason", "servers check")
    assert "challenger" in out, out[-3000:]
    mc = MlflowClient(mlflow_uri)
    name = "ilr-delg"
    champion = mc.get_model_version_by_alias(name, "champion").version
    challenger = mc.get_model_version_by_alias(name, "challenger").version
    # the registry and the artifacts are the server's: nothing fell back to the workspace's SQLite
    assert not (home / "mlflow.db").exists(), sorted(p.name for p in home.iterdir())
    stored = [p.name for p in (Path(os.environ["ILR_SERVERS_WORK"]) / "mlflow-artifacts").rglob("*") if p.is_file()]
    assert stored, "the MLflow server stored no artifacts"
    # the flows ran on the Prefect server
    with get_client(sync_client=True) as c:
        runs = c.read_flow_runs()
        flows = {f.id: f.name for f in c.read_flows()}
    done = {flows.get(r.flow_id) for r in runs if r.state and r.state.is_completed()}
    assert {"retrain", "train_and_register"} <= done, (done, [(flows.get(r.flow_id), r.state) for r in runs])

    # the service serves the index the retrain left live (the champion's, or the off-the-shelf model's when the
    # gate refused two steps of training)
    port = free_port()
    ilr("serve", "--background", "--port", str(port))
    try:
        client = Client(f"http://127.0.0.1:{port}", token=TOKEN)
        health = client.health()
        first = health["model"]
        assert health["status"] == "ok" and first in (f"models:/{name}/{champion}", "off-the-shelf"), health
        folder = next((home / "datasets" / "tiny").glob("v1-*"))
        df = manifest.read(folder)
        q = df[df["split"] == "query"].iloc[0]
        assert client.search(folder / q["path"], top_k=3)["results"]
        added = client.add(folder / q["path"], "servers-new-1", label="servers-label", domain="artwork")
        assert added["image_id"] == "servers-new-1"
        eventually(lambda: client.search(folder / q["path"], top_k=3)["results"][0]["image_id"] == "servers-new-1",
                   "an added image is not found")
        client.delete("servers-new-1")
        eventually(lambda: all(r["image_id"] != "servers-new-1"
                               for r in client.search(folder / q["path"], top_k=3)["results"]),
                   "a deleted image is still found")
        # an index of the other model moves the live alias under the running service: the promoted challenger
        # (loaded from the MLflow server), or the off-the-shelf model when the gate had promoted it already
        if first == "off-the-shelf":
            if challenger != champion:
                ilr("model", "promote", challenger)
            assert mc.get_model_version_by_alias(name, "champion").version == challenger
            ilr("index", "build", "--dataset", "tiny")
            want = f"models:/{name}/{challenger}"
        else:
            ilr("index", "build", "--dataset", "tiny", "--model", "off-the-shelf")
            want = "off-the-shelf"
        eventually(lambda: client.health()["index"] != health["index"], "the service did not follow the alias swap",
                   60)
        assert client.health()["model"] == want, client.health()
        assert client.search(folder / q["path"], top_k=3)["results"]
    finally:
        ilr("stop", timeout=180)
    if milvus_uri:
        from pymilvus import MilvusClient

        cols = MilvusClient(uri=milvus_uri).list_collections()
        assert any(c.startswith("ilr") for c in cols), cols  # the index lives on the server


def main() -> None:
    milvus = "--milvus-server" in sys.argv
    work = Path(os.environ["ILR_SERVERS_WORK"])
    if milvus:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    servers = Servers(work)
    try:
        # the three start side by side: each spends most of its start-up importing and migrating on its own
        mlflow_ready, prefect_ready = servers.mlflow(), servers.prefect()
        milvus_uri = servers.milvus_standalone() if milvus else None
        mlflow_uri, prefect_api = mlflow_ready(), prefect_ready()
        os.environ.update(MLFLOW_TRACKING_URI=mlflow_uri, PREFECT_API_URL=prefect_api, ILR_API_TOKEN=TOKEN)
        if milvus_uri:
            os.environ["MILVUS_URI"] = milvus_uri
            vector_index_checks(milvus_uri)
        lifecycle(mlflow_uri, milvus_uri)
        print("ok")
    finally:
        servers.stop()
        shutil.rmtree(work / "prefect-server", ignore_errors=True)


if __name__ == "__main__":
    main()
