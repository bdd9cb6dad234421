"""The replicas behind the Ingress: Extractor (the model, micro-batches), Searcher (Milvus and the store's
writes), Reranker (local features from the memory-mapped store, matching + RANSAC). Only the Extractor
loads torch."""
from __future__ import annotations

import asyncio
import collections
import os
import threading
import time
from typing import Any

import numpy as np
from ray import serve

from data.config import apply_worker_env, worker_env
from models.features import pack_descriptors
from serving.config import ServeConfig


def current_env() -> dict:
    """The driver's workspace for the replicas (data.config.WORKSPACE_ENV), with the Milvus URI resolved."""
    from serving.vectors import milvus_uri

    return worker_env(MILVUS_URI=milvus_uri())


class ExtractorWorker:
    """Holds the models of the live index (and, during a swap, the next one) and extracts in micro-batches."""

    def __init__(self, env: dict, cfg: ServeConfig):
        apply_worker_env(env)
        import torch

        from models.config import extract_config
        from models.extract import with_cpu_threads

        self.cfg, self.ecfg = cfg, extract_config()
        self.models: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.models_lock = threading.Lock()
        gpu = self.ecfg.device != "cpu" and torch.cuda.is_available()
        self.slots = threading.Semaphore(1 if gpu else max(1, cfg.cpu_extractions))
        if not gpu:  # extractions at once x threads each = the cores (a 384 px pyramid about fills the cache,
            # so small batches, and few extractions at once, are fastest: BENCHMARKS.md)
            self.ecfg = with_cpu_threads(self.ecfg, cfg.cpu_extractions, cfg.cpu_extract_threads)
        # on CPU the Extractor takes one image at a time (extract.cpu_batch_size): batches formed here would wait
        self.extract.set_max_batch_size(cfg.batch_size if gpu else self.ecfg.cpu_batch_size)
        self.extract.set_batch_wait_timeout_s(cfg.batch_wait_s)

    def _get(self, ref: str):
        from models import registry
        from models.extract import Extractor

        with self.models_lock:
            if ref not in self.models:
                model, _ = registry.resolve(ref)
                self.models[ref] = Extractor(model, self.ecfg)
                while len(self.models) > 2:  # the live model and the one being swapped in
                    self.models.popitem(last=False)
            self.models.move_to_end(ref)
            return self.models[ref]

    async def load(self, ref: str) -> bool:
        await asyncio.to_thread(self._get, ref)
        return True

    def _run(self, items: list[tuple[str, np.ndarray]]) -> list[dict]:
        with self.slots:
            return self._run_locked(items)

    def _run_locked(self, items: list[tuple[str, np.ndarray]]) -> list[dict]:
        out: list[dict | None] = [None] * len(items)
        for ref in dict.fromkeys(r for r, _ in items):
            idx = [i for i, (r, _) in enumerate(items) if r == ref]
            t = time.perf_counter()
            feats = self._get(ref).extract([items[i][1] for i in idx])
            compute_ms = (time.perf_counter() - t) * 1000 / len(idx)  # per image of the batch
            for i, f in zip(idx, feats):  # descriptors int8, as stored and as the re-ranker matches them
                out[i] = {"global": f.global_desc.astype(np.float32), "keypoints": f.keypoints.astype(np.float32),
                          "descriptors": pack_descriptors(f.descriptors), "size": tuple(f.size),
                          "compute_ms": compute_ms}
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01, max_concurrent_batches=2)
    async def extract(self, items: list[tuple[str, np.ndarray]]) -> list[dict]:
        return await asyncio.to_thread(self._run, items)


class SearcherWorker:
    """Owns the Milvus client: live-alias lookups, global top-K, and index writes (add / delete)."""

    def __init__(self, env: dict, cfg: ServeConfig):
        apply_worker_env(env)
        from serving.config import index_config
        from serving.vectors import milvus_client

        self.cfg, self.icfg = cfg, index_config()
        self.client = milvus_client(os.environ["MILVUS_URI"])
        self.stores: dict[str, Any] = {}
        self.indexes: dict[str, Any] = {}

    def _index(self, collection: str):
        from serving.vectors import VectorIndex

        if collection not in self.indexes:  # one per collection: loaded once, not per query
            self.indexes[collection] = VectorIndex(self.client, collection)
        return self.indexes[collection]

    def _store(self, collection: str):
        from serving.store import open_store

        return open_store(self.stores, collection)

    def live(self) -> dict | None:
        """Polled every `poll_s`: one alias lookup, then the already open store of that collection."""
        from serving.store import live

        return live(self.icfg.alias, self.client, self.stores)

    def search(self, collection: str, vector: np.ndarray, k: int) -> list[dict]:
        return self._index(collection).search(vector[None], k, self.icfg.ef_search)[0]

    def exists(self, collection: str, image_id: str) -> bool:
        return image_id in self._store(collection)

    def add(self, collection: str, image_id: str, label: str, domain: str, feats: dict,
            thumbnail: bytes | None = None) -> bool:
        """Add unless the collection has the id (checked and added under the store's write lock, so a retried
        or concurrent add never inserts twice); False when it was there."""
        from models.features import pack_keypoints
        from serving.store import store_new

        return store_new(self._index(collection), self._store(collection), image_id, label, domain,
                         feats["global"], pack_keypoints(feats["keypoints"]), feats["descriptors"], feats["size"],
                         self.icfg, thumbnail)

    def delete(self, collection: str, image_id: str) -> bool:
        from serving.store import remove

        return remove(self._index(collection), self._store(collection), image_id)

    def thumbnail(self, collection: str, image_id: str) -> bytes | None:
        return self._store(collection).thumbnail(image_id)

    def stored_query(self, collection: str, image_id: str) -> dict | None:
        """An index image's stored features in the Extractor's query form (search by example), or None."""
        store = self._store(collection)
        got = store.get_many([image_id])[0]
        if got is None:
            return None
        kp, desc, size = got
        return {"global": store.global_many([image_id])[0], "keypoints": np.array(kp), "descriptors": np.array(desc),
                "size": size}

    def examples(self, collection: str, n: int) -> list[dict]:
        """A fixed sample of up to n live images with their labels and domains."""
        ids = self._store(collection).sample_ids(n)
        meta = self._index(collection).describe(ids)
        return [{"image_id": i, **meta.get(i, {"label": None, "domain": None})} for i in ids]

    def index_sample(self, collection: str, n: int) -> np.ndarray:
        """Up to n stored global vectors, a fixed sample: only those n rows are read."""
        return self._store(collection).sample_vectors(n)


class RerankerWorker:
    """Local features of the candidates from the memory-mapped store (int8, as stored), mutual matching +
    RANSAC, on CPU."""

    def __init__(self, env: dict, cfg: ServeConfig):
        apply_worker_env(env)
        from models.config import rerank_config
        from models.rerank import Reranker

        self.reranker = Reranker(rerank_config())
        self.stores: dict[str, Any] = {}

    def rerank(self, collection: str, q: dict, hits: list[dict], matches_for: int = 0) -> dict:
        """{"hits": re-ordered hits with inliers and final_score, "compute_ms": time spent here}; the first
        `matches_for` hits also get their correspondences ("matches": inliers and rejected putative matches,
        query xy <-> result xy in original-image pixels) and the result's original "size"."""
        from models.features import unpack_local
        from serving.store import open_store

        t = time.perf_counter()
        store = open_store(self.stores, collection)
        empty = (np.zeros((0, 2), np.uint16), np.zeros((0, store.dim or 1), np.int8), None)
        # an image deleted since the search stays in the list, with no inliers
        cands = [c if c is not None else empty for c in store.get_many([h["image_id"] for h in hits])]
        refine = self.reranker.cfg.refine != "none" and store.global_dim is not None
        q_kp, q_desc = unpack_local(q["keypoints"], q["descriptors"])
        r = self.reranker.rerank(q_kp, q_desc, cands,
                                 np.array([h["score"] for h in hits], np.float32),
                                 *((q["global"], store.global_many([h["image_id"] for h in hits])) if refine else ()))
        out = [{**hits[i], "inliers": int(r.inliers[i]), "final_score": float(r.scores[i]),
                "recognition": float(r.recognition[i])} for i in r.order]
        for h, i in zip(out[:matches_for], r.order[:matches_for]):
            h["matches"] = self.reranker.correspondences(q_kp, q_desc, cands[i])
            h["size"] = list(cands[i][2]) if cands[i][2] is not None else None
        return {"hits": out, "compute_ms": (time.perf_counter() - t) * 1000}
