"""Building a collection: extract a dataset version's index images with a model, insert the global
descriptors into Milvus (serving.vectors) and the local features into the store (serving.store), replay the
API's change log (serving.changes), check ANN recall, then move the live alias.

Builds are resumable (images already stored are skipped), one per collection at a time, and incremental
(the service adds and deletes images between builds; every build replays those changes).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from data import manifest
from data.config import apply_worker_env, ilr_home, worker_env
from data.errors import IlrError
from data.images import file_thumbnail
from data.locks import workspace_lock
from data.versioning import dataset_dir
from models.extract import Extractor, with_cpu_threads
from models.features import pack_local
from serving.changes import ChangeLog
from serving.config import IndexConfig, index_config
from serving.store import LocalFeatureStore, remove, store_dir, store_new
from serving.vectors import VectorIndex, collection_name, milvus_client, recall_at_k


@dataclass
class BuildResult:
    collection: str
    added: int
    skipped: int
    total: int
    recall: float
    alias_moved: bool
    model: str
    seconds: float


def model_key(model, model_ref: str) -> str:
    """Names the model part of a collection: registry version when known, plus a hash of the weights, so
    that a retrained or promoted model never reuses another model's vectors."""
    h = hashlib.sha1()
    for k, v in sorted(model.inference_state().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    m = re.search(r"/(\d+)$", model_ref)
    prefix = "ots" if model_ref == "off-the-shelf" else (f"v{m.group(1)}" if m else "x")
    return f"{prefix}_{h.hexdigest()[:8]}"


class _RayExtract:
    """Ray Data map_batches worker: one model per actor; returns packed features (uint16 / int8)."""

    def __init__(self, model_dir: str, ecfg, root: str, env: dict):
        import torch

        from models import artifacts

        apply_worker_env(env)

        model = artifacts.load(Path(model_dir))
        if not torch.cuda.is_available():  # the build is the only heavy work of its node: all its cores
            ecfg = with_cpu_threads(ecfg)
        self.extractor = Extractor(model, ecfg, device="cuda" if torch.cuda.is_available() else None)
        self.root = Path(root)

    def __call__(self, batch):
        import pandas as pd

        feats = self.extractor.extract([self.root / p for p in batch["path"]])
        packed = [pack_local(f) for f in feats]
        return pd.DataFrame({
            "image_id": batch["image_id"].to_numpy(), "label": batch["label"].to_numpy(),
            "domain": batch["domain"].to_numpy(),
            "global": [f.global_desc.astype(np.float32).tobytes() for f in feats],
            "kp": [k.tobytes() for k, _ in packed], "desc": [d.tobytes() for _, d in packed],
            "n": [len(k) for k, _ in packed], "width": [f.size[0] for f in feats],
            "height": [f.size[1] for f in feats]})


def _extract_local(todo, folder: Path, model, ecfg, chunk: int):
    extractor = Extractor(model, ecfg)
    for start in range(0, len(todo), chunk):
        part = todo.iloc[start:start + chunk]
        feats = extractor.extract([folder / p for p in part["path"]])
        yield [(i, lab, dom, f.global_desc.astype(np.float32), *pack_local(f), f.size)
               for i, lab, dom, f in zip(part["image_id"], part["label"], part["domain"], feats)]


def _extract_ray(todo, folder: Path, model, ecfg, chunk: int, model_dir: Path, actors: int = 0):
    """Ray Data: a pool of extraction actors (GPU actors when the cluster has GPUs), results streamed back
    in order of completion; the driver only writes."""
    import ray

    from models.cluster import ensure_ray

    ensure_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the CLI draws its own
    ctx.enable_operator_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    gpus = ray.cluster_resources().get("GPU", 0)
    actors = actors or (max(1, int(gpus)) if gpus else
                        max(1, sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)))
    ds = ray.data.from_pandas(todo[["image_id", "path", "label", "domain"]])
    from models import artifacts

    artifacts.save(model, model_dir)  # actors load it from disk (a shared path on a cluster: ILR_HOME)
    ds = ds.map_batches(_RayExtract, fn_constructor_kwargs={"model_dir": str(model_dir), "ecfg": ecfg,
                                                            "root": str(folder), "env": worker_env()},
                        batch_size=chunk, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=actors),
                        # an actor whose node died is restarted elsewhere and its batch retried (never lost)
                        max_restarts=-1, max_task_retries=-1, scheduling_strategy="SPREAD",  # one per node
                        num_gpus=1 if gpus else 0, num_cpus=0.5 if not gpus else 1)
    for batch in ds.iter_batches(batch_size=chunk, batch_format="pandas", prefetch_batches=1):
        yield [(r.image_id, r.label, r.domain, np.frombuffer(r["global"], np.float32),
                np.frombuffer(r.kp, np.uint16).reshape(int(r.n), 2),
                np.frombuffer(r.desc, np.int8).reshape(int(r.n), -1), (int(r.width), int(r.height)))
               for _, r in batch.iterrows()]


def replay_changes(log: ChangeLog, index: VectorIndex, store: LocalFeatureStore, model, ecfg,
                   cfg: IndexConfig) -> tuple[int, int]:
    """Bring the collection in line with the API's change log: (added, deleted). Added images are extracted
    from their stored bytes with this collection's model."""
    from data.images import decode, thumbnail_jpeg

    added = deleted = 0
    extractor = None
    for image_id, change in log.state().items():
        if change.op == "delete":
            deleted += remove(index, store, image_id)
        elif image_id not in store:
            extractor = extractor or Extractor(model, ecfg)
            image = np.asarray(decode(log.blob(change), f"API add {image_id}"))
            f = extractor.extract([image])[0]
            added += store_new(index, store, image_id, change.label, change.domain,
                               f.global_desc.astype(np.float32), *pack_local(f), f.size, cfg, thumbnail_jpeg(image))
    return added, deleted


def choose_engine(engine: str, n_images: int) -> tuple[str, str]:
    """(engine, why). "auto" takes Ray Data where it adds workers: a Ray cluster (RAY_ADDRESS) or GPUs. On a
    lone CPU machine one extraction actor would use the same cores as the in-process path, plus Ray's
    start-up (~8 s) and its data transfers: 0.60x raw extraction on a 110-image build, 0.86x on 1,000
    images, against 0.87-1.11x in-process (BENCHMARKS.md)."""
    if engine not in ("auto", "ray", "local"):
        raise IlrError(f"unknown engine {engine!r}", hint="one of: auto, ray, local")
    if engine != "auto":
        return engine, "asked for"
    if os.environ.get("RAY_ADDRESS"):
        return "ray", "RAY_ADDRESS is set"
    import torch

    if torch.cuda.is_available():
        return "ray", "GPUs present"
    return "local", f"{n_images} images on one CPU machine: in-process is faster than Ray Data there"


def build(dataset: str, model_uri: str | None = None, cfg: IndexConfig | None = None, ecfg=None,
          log_fn: Callable[[str], None] = print, progress: Callable[[int, int], None] | None = None,
          engine: str | None = None, swap: bool = True) -> BuildResult:
    """Extract the index split of NAME[@VERSION] into a new (or partly built) collection, check its ANN
    recall, then point the live alias at it. engine: "ray" (Ray Data map_batches), "local" (in-process) or
    "auto" (choose_engine); default index.engine."""
    from models import registry
    from models.config import extract_config

    cfg, ecfg = cfg or index_config(), ecfg or extract_config()  # the service extracts queries with params.yaml's
    t0 = time.perf_counter()
    # the Milvus client (pymilvus import + connection, ~1 s) is made while the dataset and model resolve
    connecting = ThreadPoolExecutor(max_workers=1)
    client = connecting.submit(milvus_client)
    connecting.shutdown(wait=False)
    version, folder = dataset_dir(dataset)
    model, model_ref = registry.resolve(model_uri)
    name = collection_name(model_key(model, model_ref), version.name, version.version)
    df = manifest.read(folder)
    rows = df[df["split"] == "index"].reset_index(drop=True)
    log = ChangeLog(version.name)
    changes = log.state()
    if changes:  # the API's last word on an id wins: a takedown stays down, a replaced image stays replaced
        rows = rows[~rows["image_id"].isin(list(changes))].reset_index(drop=True)
    if len(rows) == 0 and not any(c.op == "add" for c in changes.values()):
        raise IlrError(f"dataset {version.ref} has no index images")
    # one build per collection at a time (a retrain and a manual build): two would insert every row twice
    with workspace_lock(f"build-{name}", on_wait=lambda: log_fn(f"another build of {name} is running: waiting")):
        store = LocalFeatureStore(store_dir(name))
        store.set_meta(model=model_ref, dataset=version.ref, dataset_name=version.name,
                       dataset_version=version.version, built_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        index = VectorIndex(client.result(), name)
        todo = rows[~rows["image_id"].map(store.__contains__)].reset_index(drop=True)
        engine, why = choose_engine(engine or cfg.engine, len(todo))
        log_fn(f"index {name}: {len(rows) - len(todo)} of {len(rows)} images already built; extracting {len(todo)}"
               f" ({engine}: {why})")
        created = index.client.has_collection(name)
        batches = (_extract_ray(todo, folder, model, ecfg, cfg.chunk, ilr_home() / "cache" / "extract-models" / name,
                                cfg.actors)
                   if engine == "ray" and len(todo)
                   else _extract_local(todo, folder, model, ecfg, cfg.chunk))
        done = 0
        # resuming after a crash between the Milvus insert and the local store: those rows are in Milvus already
        in_milvus = index.existing(list(todo["image_id"])) if created and len(todo) else set()
        seen: set[str] = set()
        for part in batches:
            # a batch retried after its actor (or node) died must not add an image twice
            part = [r for r in part if r[0] not in seen]
            seen.update(r[0] for r in part)
            if not part:
                continue
            if not created:
                index.create(len(part[0][3]), cfg)
                created = True
            index.insert([{"image_id": i, "label": lab, "domain": dom, "vector": g.tolist()}
                          for i, lab, dom, g, *_ in part if i not in in_milvus])
            for i, _, _, g, kp, desc, size in part:  # after Milvus: a stored image is fully indexed
                store.add_packed(i, kp, desc, g, size)
            done += len(part)
            progress and progress(done, len(todo))
        missing = store.without_thumbnail(list(rows["image_id"]))  # new images, and collections built before
        if missing:
            paths = dict(zip(rows["image_id"], rows["path"]))
            with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
                for image_id, jpeg in zip(missing, pool.map(lambda i: file_thumbnail(folder / paths[i]), missing)):
                    if jpeg:
                        store.put_thumbnail(image_id, jpeg)
        replayed = replay_changes(log, index, store, model, ecfg, cfg)
        if any(replayed):
            log_fn(f"API changes replayed: {replayed[0]} added, {replayed[1]} deleted")
        if index.client.has_collection(name):
            index.seal()
        ids, vectors = store.global_vectors()
        recall = recall_at_k(index, ids, vectors, cfg.recall_k, cfg.recall_queries, cfg.ef_search)
        moved = False
        if recall < cfg.min_recall:
            log_fn(f"ANN recall@{min(cfg.recall_k, len(ids))} {recall:.4f} < {cfg.min_recall}: {cfg.alias} not moved")
        elif swap:
            index.point_alias(cfg.alias)
            moved = True
            log_fn(f"ANN recall@{min(cfg.recall_k, len(ids))} {recall:.4f} >= {cfg.min_recall}: {cfg.alias} -> {name}")
            # changes the API logged while this build ran went to the collection that was live then: once the
            # alias has moved, the service re-checks it after each change, so one more replay closes the gap
            late = replay_changes(log, index, store, model, ecfg, cfg)
            if any(late):
                log_fn(f"API changes made during the build replayed: {late[0]} added, {late[1]} deleted")
            ids = store.ids()
        log.close()
        store.set_meta(recall=f"{recall:.4f}", count=len(ids))
        store.close()
        return BuildResult(name, len(todo), len(rows) - len(todo), len(ids), recall, moved, model_ref,
                           time.perf_counter() - t0)
