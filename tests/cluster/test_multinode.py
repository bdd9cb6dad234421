"""ilr on a multi-node Ray cluster: a head and two worker nodes started with `ray start` as separate process
trees on this machine (on the loopback address 127.0.0.2 only, token authentication), joined through RAY_ADDRESS exactly as a user
joins a real cluster. In each of index build, serving and tune a worker node is killed (SIGKILL to its
whole process tree: raylet, object store, workers) while it holds work, and nothing may be lost.

Worker node A carries the custom resource `node_a`, node B `node_b`; the head has no CPUs, so all work
runs on the worker nodes. Each test starts again from two live worker nodes.
"""
from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tests.conftest import copy_workspace, workspace_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
RAY_ENV = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
TOKEN = "test-token-0123456789"
# every node on a loopback address: Ray keeps 127.0.0.2 as given (127.0.0.1 it would swap for the routable
# address once multi-node clusters are on), and a driver joining it takes the same address (models.cluster)
NODE_IP = "127.0.0.2"
# a driver that stays connected and answers "which nodes are alive" for each line on its stdin
WATCH = """
import json, sys, ray
ray.init(address=sys.argv[1], _node_ip_address=sys.argv[2], log_to_driver=False, configure_logging=False)
for _ in sys.stdin:
    print("NODES " + json.dumps([n["Resources"] for n in ray.nodes() if n["Alive"]]), flush=True)
"""
def _lines(stream, answers: queue.Queue) -> None:
    for line in stream:
        if line.startswith("NODES "):
            answers.put(json.loads(line[6:]))


TRIAL = ("ImplicitFunc", "_Inner", "_trainable")  # the process title of a Tune trial's actor


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    """Every port a node would otherwise take at a fixed default: distinct per node on one machine."""
    return [f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"]


class Cluster:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.temp_dir = tempfile.mkdtemp(prefix="ilr-ray-", dir="/tmp")  # short: Ray's socket paths are long
        (tmp / "user").mkdir(exist_ok=True)
        self.port = _free_port()
        self.address = f"{NODE_IP}:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if k not in RAY_ENV}
        self.env.update(HOME=str(tmp / "user"), PYTHONPATH=str(ROOT), PATH=f"{VENV_BIN}:{os.environ['PATH']}",
                        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),  # the cluster's token
                        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1",  # multi-node (Linux's default)
                        RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="2000",
                        RAY_health_check_failure_threshold="3", RAY_USAGE_STATS_ENABLED="0")
        self.nodes: dict[str, subprocess.Popen] = {}
        self.watcher: subprocess.Popen | None = None

    def start(self) -> None:
        self.start_head()
        for name in ("a", "b"):
            self.start_worker(name)

    def start_head(self) -> None:
        """Start the head and wait until its GCS answers. On a loaded machine the head's raylet can miss Ray's
        start-up deadline and `ray start` gives up: kill what it left and start it again on a fresh port."""
        for attempt in range(3):
            self._start("head", ["--head", f"--port={self.port}", "--num-cpus=0", "--include-dashboard=false",
                                 f"--dashboard-port={_free_port()}",
                                 f"--ray-client-server-port={_free_port()}"])
            deadline = time.monotonic() + 120
            while self.nodes["head"].poll() is None and time.monotonic() < deadline:
                if self.alive():
                    return
                time.sleep(1)
            try:
                os.killpg(self.nodes["head"].pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if self.watcher is not None:  # it asked the old address
                self.watcher.kill()
                self.watcher = None
            self.port = _free_port()
            self.address = f"{NODE_IP}:{self.port}"
        raise AssertionError("the head node did not start\n" + self.logs())

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.tmp / f"node-{name}.log", "ab")
        self.nodes[name] = subprocess.Popen(
            [str(VENV_BIN / "ray"), "start", "--block", f"--node-ip-address={NODE_IP}", "--disable-usage-stats",
             f"--temp-dir={self.temp_dir}", *_node_ports(), *args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start_worker(self, name: str) -> None:
        """Start worker node `name` and wait until the cluster has it. On a loaded machine a raylet can miss
        Ray's start-up deadline and its `ray start` gives up: start it again (twice at most)."""
        for attempt in range(3):
            self._start(name, [f"--address={self.address}", "--num-cpus=1",
                               f"--resources={json.dumps({f'node_{name}': 1})}"])
            self.wait_nodes()
            if self.nodes[name].poll() is None:
                return
        raise AssertionError(f"worker node {name} did not start\n" + self.logs())

    def alive(self) -> list[dict]:
        """The live nodes' resources, from one long-lived driver (a new Python + ray.init per question costs
        seconds of CPU that the rest of the suite needs); a driver that does not answer is replaced."""
        if self.watcher is None or self.watcher.poll() is not None:
            self.watcher = subprocess.Popen([sys.executable, "-c", WATCH, self.address, NODE_IP], env=self.env,
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                            text=True, start_new_session=True)
            self.answers = queue.Queue()
            threading.Thread(target=_lines, args=(self.watcher.stdout, self.answers), daemon=True).start()
        try:
            self.watcher.stdin.write("\n")
            self.watcher.stdin.flush()
            return self.answers.get(timeout=60)
        except (BrokenPipeError, OSError, queue.Empty):
            self.watcher.kill()  # not connected (the head still starting) or stuck: a new one next time
            time.sleep(1)
            return []

    def wait_nodes(self, timeout_s: float = 120) -> None:
        """Until every started node with a live process is alive in the GCS, and no killed one is."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            want = sorted(f"node_{n}" for n, p in self.nodes.items() if n != "head" and p.poll() is None)
            have = sorted(k for r in self.alive() for k in r if k.startswith("node_"))
            if have == want:
                return
            time.sleep(1)
        raise AssertionError(f"cluster nodes: want {want}, have {have}\n" + self.logs())

    def ensure_workers(self) -> None:
        for name in ("a", "b"):
            if self.nodes[name].poll() is not None:
                self.start_worker(name)

    def processes(self, name: str) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.nodes[name].pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def titles(self, name: str) -> list[str]:
        out = []
        for p in self.processes(name):
            try:
                out.append(" ".join(p.cmdline()))
            except psutil.Error:
                pass
        return out

    def running(self, name: str, *markers: str) -> bool:
        """Whether a process of node `name` has a title (Ray's `ray::Actor.method`) with one of `markers`."""
        return any(m in t for t in self.titles(name) if t.startswith("ray::") for m in markers)

    def kill(self, name: str) -> None:
        """A node failure: SIGKILL to the node's whole process tree at once."""
        procs = self.processes(name)
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=30)
        self.nodes[name].wait(timeout=30)
        self.wait_nodes()

    def shutdown_serve(self) -> None:
        """Remove whatever Serve apps are left on the cluster. Serve's shutdown can outlast the `ilr serve` that
        started it when a replica's node died; a left-over app would take the worker nodes' CPUs (its replica
        comes back on a restarted node) and the next test's trials would never be placed."""
        code = "from models.cluster import ensure_ray; ensure_ray(); from ray import serve; serve.shutdown()"
        try:
            subprocess.run([str(VENV_BIN / "python"), "-c", code], cwd=ROOT, env=self.env, capture_output=True,
                           timeout=120)
        except subprocess.TimeoutExpired:
            pass

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.tmp.glob("node-*.log"))

    def stop(self) -> None:
        # not `ray stop`: it would stop every Ray of this user; our own process trees only
        if self.watcher is not None:
            self.watcher.kill()
        for name in list(self.nodes):
            for p in self.processes(name):
                try:
                    p.send_signal(signal.SIGKILL)
                except psutil.Error:
                    pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_template):
    tmp = tmp_path_factory.mktemp("cluster")
    c = Cluster(tmp)
    try:
        c.start()
    except BaseException:
        c.stop()  # the nodes that did start
        raise
    copy_workspace(tiny_template, tmp)
    params = {
        "tune": {"trials": 2, "steps": 10, "val_every": 2, "cpus_per_trial": 1, "max_concurrent": 2,
                 "grace_period": 6, "max_failures": 3,  # 6 = every report: no early stop
                 "space": {"lr": ["choice", [0.01]], "dim": ["choice", [64]], "image_size": ["choice", [96]]}},
        "train": {"batch_size": 8, "workers": 1},
        "index": {"chunk": 2, "min_recall": 0.9},
        # everything on node A except the Reranker, scaled out to one replica per node
        "serve": {"deployments": {name: {"resources": {"node_a": 0.01}} for name in ("Ingress", "Extractor", "Searcher")}
                  | {"Reranker": {"num_replicas": 2, "max_replicas_per_node": 1}}},
    }
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    c.env.update(workspace_env(tmp), ILR_PARAMS=str(tmp / "params.yaml"), RAY_ADDRESS=c.address,
                 ILR_API_TOKEN=TOKEN)
    c.env.pop("MLFLOW_TRACKING_URI", None)
    yield c
    # the workspace's Milvus Lite server (started by the first ilr command that needed it), then the nodes
    subprocess.run([str(VENV_BIN / "ilr"), "stop"], cwd=ROOT, env={k: v for k, v in c.env.items() if k != "RAY_ADDRESS"},
                   capture_output=True, timeout=120)
    c.stop()


def _ilr(cluster: Cluster, *args: str, log: str) -> subprocess.Popen:
    out = open(cluster.tmp / log, "wb")
    return subprocess.Popen([str(VENV_BIN / "ilr"), *args], cwd=ROOT, env=cluster.env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait_then_kill(cluster: Cluster, proc: subprocess.Popen, node: str, markers: tuple[str, ...],
                    ready=lambda: True, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not (cluster.running(node, *markers) and ready()):
        why = (f"node {node} never ran {markers} while ready={ready()}; its Ray processes: "
               f"{[t.strip() for t in cluster.titles(node) if t.startswith('ray::')]}")
        assert proc.poll() is None, "the command finished first: " + why
        assert time.monotonic() < deadline, why + "\n" + cluster.logs()
        time.sleep(0.5)
    cluster.kill(node)


def _finish(cluster: Cluster, proc: subprocess.Popen, log: str, timeout_s: float = 600) -> str:
    try:
        proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = (cluster.tmp / log).read_text(errors="replace")
    assert proc.returncode == 0, text[-5000:] + cluster.logs()
    return text


def test_index_build_loses_no_image_when_a_worker_node_dies(cluster):
    """`ilr index build --engine ray` runs one extraction actor per worker node; node B dies while its actor
    works; the actor is restarted on node A, its batch retried, and the index is complete, without a
    duplicate, and recall-checked."""
    from data import manifest

    cluster.ensure_workers()
    proc = _ilr(cluster, "index", "build", "--dataset", "tiny", "--engine", "ray", "--model", "off-the-shelf",
                log="index.log")
    _wait_then_kill(cluster, proc, "b", ("MapWorker",))
    out = _finish(cluster, proc, "index.log")
    assert "live alias moved" in out, out
    folder = next((Path(cluster.env["ILR_HOME"]) / "datasets" / "tiny").glob("v1-*"))
    df = manifest.read(folder)
    want = int((df["split"] == "index").sum())
    check = subprocess.run([sys.executable, "-c", (
        "from data.config import pin_workspace; pin_workspace()\n"
        "from serving import milvus_server; milvus_server.ensure()\n"
        "from serving.vectors import VectorIndex\n"
        "from serving.store import live\n"
        "import json\n"
        "st = live()\n"
        "ix = VectorIndex.connect(st['collection'])\n"
        "print(json.dumps({'count': ix.count(), 'store': st['count']}))")],
        cwd=ROOT, env={k: v for k, v in cluster.env.items() if k != "RAY_ADDRESS"}, capture_output=True, text=True,
        timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    counts = json.loads(check.stdout.strip().splitlines()[-1])
    assert counts == {"count": want, "store": want}, counts  # Milvus counts a re-inserted id twice


def test_service_answers_while_a_node_with_a_replica_dies(cluster):
    """The Reranker scaled out to one replica per node (params `serve.deployments`), everything else pinned to
    node A; node B, holding only a Reranker replica, dies under a stream of searches: none fails."""
    cluster.ensure_workers()
    port = _free_port()
    proc = _ilr(cluster, "serve", "--port", str(port), log="serve.log")
    url = f"http://127.0.0.1:{port}"
    from data import manifest

    folder = next((Path(cluster.env["ILR_HOME"]) / "datasets" / "tiny").glob("v1-*"))
    df = manifest.read(folder)
    query = folder / df[df["split"] == "query"].iloc[0]["path"]
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (cluster.tmp / "serve.log").read_text()[-5000:]
            try:
                if httpx.get(f"{url}/healthz", timeout=5).json().get("status") == "ok":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            assert time.monotonic() < deadline, (cluster.tmp / "serve.log").read_text()[-5000:]
            time.sleep(1)
        assert cluster.running("b", "Reranker") and not any(
            cluster.running("b", d) for d in ("Ingress", "Extractor", "Searcher"))
        results: list[int] = []
        stop = threading.Event()

        def load():
            with httpx.Client(base_url=url, timeout=180) as http:
                while not stop.is_set():
                    r = http.post("/v1/search", files={"image": ("q.jpg", query.read_bytes(), "image/jpeg")})
                    results.append(r.status_code)

        t = threading.Thread(target=load)
        t.start()
        while len(results) < 3:
            time.sleep(0.2)
        cluster.kill("b")
        n = len(results)
        while len(results) < n + 5 and t.is_alive():
            time.sleep(0.2)
        stop.set()
        t.join(timeout=300)
        assert results and set(results) == {200}, results
        assert len(results) >= n + 5
    finally:
        # SIGTERM, as `ilr stop` sends: a Ctrl-C (SIGINT) would be ignored when the suite itself was started
        # with SIGINT ignored (a background job of a shell), which the child inherits
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        cluster.shutdown_serve()


def test_tune_completes_when_a_worker_node_dies(cluster):
    """`ilr tune` runs two trials of one CPU each on worker nodes of one CPU each; once every started trial
    has written a checkpoint, a node running one dies; Ray Tune retries that trial from the checkpoint (FailureConfig) and the
    search finishes both trials and registers the challenger."""
    cluster.ensure_workers()
    results = Path(cluster.env["ILR_HOME"]) / "ray_results"
    proc = _ilr(cluster, "tune", "--dataset", "tiny", log="tune.log")

    def all_checkpointed() -> bool:
        """Every trial started so far has a checkpoint: whichever node dies, its trial can be restored."""
        trials = list(results.glob("tune-*/_trainable_*"))
        return bool(trials) and all(any(t.glob("checkpoint_*")) for t in trials)

    deadline = time.monotonic() + 300
    while not (victim := next((n for n in ("b", "a") if cluster.running(n, *TRIAL)), None)) or not all_checkpointed():
        assert proc.poll() is None, "the tune finished before a node held a checkpointed trial"
        assert time.monotonic() < deadline, cluster.logs()
        time.sleep(0.5)
    cluster.kill(victim)
    out = _finish(cluster, proc, "tune.log")
    assert "2 trial(s) finished" in out and "as challenger" in out, out
    # the trial on the dead node failed, was restored from its checkpoint and went on from there
    import csv

    (failed,) = [d for d in results.glob("tune-*/_trainable_*") if (d / "error.txt").exists()]
    rows = list(csv.DictReader(open(failed / "progress.csv")))
    steps = [int(r["step"]) for r in rows]
    # Tune either keeps the first attempt's rows (then its counters show the restore) or starts the log
    # again (then it starts after the checkpoint); a restart from scratch would report step 2 again. A step
    # reported after the last checkpoint and before the node died is reported again after the restore
    # (seen: 2, 4, 4, 6, ...), so only the first step must be unique.
    restored = any(int(r["iterations_since_restore"]) < int(r["training_iteration"]) for r in rows) or steps[0] > 2
    assert restored and steps == sorted(steps) and steps.count(steps[0]) == 1, rows
    assert steps[-1] == 10, steps
