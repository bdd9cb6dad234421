"""The house rules that code can check: layers import downward only, no import cycle (lazy imports
included), and the Searcher and Reranker replicas never load torch."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["data", "models", "serving", "monitoring", "flows"]  # each may import only those before it


def _imports() -> dict[str, set[str]]:
    """module -> product modules it imports, anywhere in the file (function-level imports too)."""
    graph: dict[str, set[str]] = {}
    for layer in LAYERS:
        for path in (ROOT / layer).rglob("*.py"):
            mod = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            deps = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                deps |= {n for n in names if n.split(".")[0] in LAYERS}
            graph[mod] = deps
    known = set(graph)
    return {m: {d for d in deps if d in known and d != m} for m, deps in graph.items()}


def test_layers_import_downward_only():
    for mod, deps in _imports().items():
        for dep in deps:
            assert LAYERS.index(dep.split(".")[0]) <= LAYERS.index(mod.split(".")[0]), f"{mod} imports {dep}"


def test_no_import_cycle():
    graph = _imports()
    index, low, stack, on, cycles, n = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_searcher_and_reranker_replicas_do_not_load_torch(tmp_path):
    """What those replicas import and run (the store, the vector index, the matcher) stays torch-free."""
    code = """
import sys
import numpy as np
from serving.workers import RerankerWorker, SearcherWorker  # noqa: F401
import serving.app, serving.store, serving.vectors  # noqa: F401
from models.features import Features
from serving.store import LocalFeatureStore, store_dir
from serving.config import ServeConfig
rng = np.random.default_rng(0)
def feats(n):
    d = rng.normal(size=(n, 16)).astype(np.float32)
    return Features(np.ones(8, np.float32) / np.sqrt(8), rng.uniform(0, 300, (n, 2)).astype(np.float32),
                    d / np.linalg.norm(d, axis=1, keepdims=True), np.ones(n), np.ones(n), (320, 240))
store = LocalFeatureStore(store_dir("c"))
for i in range(3):
    store.add(f"img{i}", feats(40))
f = feats(40)
worker = RerankerWorker({}, ServeConfig())
q = {"global": f.global_desc, "keypoints": f.keypoints, "descriptors": (f.descriptors * 127).astype(np.int8),
     "size": (320, 240)}
out = worker.rerank("c", q, [{"image_id": f"img{i}", "score": 0.5, "label": "x", "domain": "other"} for i in range(3)])
assert len(out["hits"]) == 3
print("torch" in sys.modules)
"""
    env = {"ILR_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "False", r.stdout
