"""The Ray Serve retrieval graph: Ingress (FastAPI) -> Extractor (batched) -> Searcher (Milvus) -> Reranker.

Consistency during swaps: every request is answered with one (model, collection) pair — the collection
the alias `ilr_live` points at and the model that built it (recorded beside the collection). The Ingress
re-reads the alias every `poll_s`; when it moved, the Extractor loads the new model first and only then do
new requests switch, so a promotion + index swap drops nothing and never mixes vectors of two models.
(Serving a freshly promoted champion against vectors made by the old model would return nonsense, so the
champion goes live together with the index built from it: `ilr index build`, or the Prefect flow
`build_and_swap_index`. /healthz says when the champion is newer than the index.)
"""

import asyncio
import base64
import binascii
import collections
import hmac
import json
import os
import threading
import time
from typing import Any

import numpy as np
from fastapi import Request
from ray import serve

from data.config import apply_worker_env, worker_env
from data.errors import IlrError
from serving.config import ServeConfig, api_token, serve_config

def current_env() -> dict:
    """The driver's workspace for the replicas (data.config.WORKSPACE_ENV), with the Milvus URI resolved."""
    from serving.index import milvus_uri

    return worker_env(MILVUS_URI=milvus_uri())


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        self.status, self.code, self.message = status, code, message
        super().__init__(message)


# ---------------------------------------------------------------------------------------------- workers

class ExtractorWorker:
    """Holds the models of the live index (and, during a swap, the next one) and extracts in micro-batches."""

    def __init__(self, env: dict, cfg: ServeConfig):
        apply_worker_env(env)
        import dataclasses

        import torch

        from models.config import extract_config

        self.cfg, self.ecfg = cfg, extract_config()
        self.models: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.models_lock = threading.Lock()
        gpu = self.ecfg.device != "cpu" and torch.cuda.is_available()
        self.slots = threading.Semaphore(1 if gpu else max(1, cfg.cpu_extractions))
        if not gpu and not self.ecfg.cpu_threads:
            # on CPU, extractions at once x threads each = the cores (a 384 px pyramid about fills the cache,
            # so small batches, and few extractions at once, are fastest: BENCHMARKS.md)
            threads = cfg.cpu_extract_threads or max(1, (os.cpu_count() or 1) // max(1, cfg.cpu_extractions))
            self.ecfg = dataclasses.replace(self.ecfg, cpu_threads=threads)
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
            for i, f in zip(idx, feats):
                out[i] = {"global": f.global_desc.astype(np.float32), "keypoints": f.keypoints.astype(np.float32),
                          "descriptors": f.descriptors.astype(np.float32), "size": tuple(f.size),
                          "compute_ms": compute_ms}
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01, max_concurrent_batches=2)
    async def extract(self, items: list[tuple[str, np.ndarray]]) -> list[dict]:
        return await asyncio.to_thread(self._run, items)


class SearcherWorker:
    """Owns the Milvus client: live-alias lookups, global top-K, and index writes (add / delete)."""

    def __init__(self, env: dict, cfg: ServeConfig):
        apply_worker_env(env)
        from serving.index import index_config, milvus_client

        self.cfg, self.icfg = cfg, index_config()
        self.client = milvus_client(os.environ["MILVUS_URI"])
        self.stores: dict[str, Any] = {}
        self.indexes: dict[str, Any] = {}

    def _index(self, collection: str):
        from serving.index import VectorIndex

        if collection not in self.indexes:  # one per collection: loaded once, not per query
            self.indexes[collection] = VectorIndex(self.client, collection)
        return self.indexes[collection]

    def _store(self, collection: str):
        from serving.index import LocalFeatureStore, store_dir

        if collection not in self.stores:
            self.stores[collection] = LocalFeatureStore(store_dir(collection))
        return self.stores[collection]

    def live(self) -> dict | None:
        """Polled every `poll_s`: one alias lookup, then the already open store of that collection."""
        from serving.index import VectorIndex

        name = VectorIndex(self.client, self.icfg.alias).alias_target(self.icfg.alias)
        if name is None:
            return None
        store = self._store(name)
        return {"collection": name, **store.meta(), "count": store.count()}

    def search(self, collection: str, vector: np.ndarray, k: int) -> list[dict]:
        return self._index(collection).search(vector[None], k, self.icfg.ef_search)[0]

    def exists(self, collection: str, image_id: str) -> bool:
        return image_id in self._store(collection)

    def add(self, collection: str, image_id: str, label: str, domain: str, feats: dict) -> bool:
        """Add unless the collection has the id (checked and added under the store's write lock, so a retried
        or concurrent add never inserts twice); False when it was there."""
        from models.extract import Features, pack_local
        from serving.index import store_new

        f = Features(feats["global"], feats["keypoints"], feats["descriptors"], np.zeros(0), np.zeros(0),
                     feats["size"])
        return store_new(self._index(collection), self._store(collection), image_id, label, domain,
                         f.global_desc, *pack_local(f), f.size, self.icfg)

    def delete(self, collection: str, image_id: str) -> bool:
        from serving.index import remove

        return remove(self._index(collection), self._store(collection), image_id)

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

    def rerank(self, collection: str, q: dict, hits: list[dict]) -> dict:
        """{"hits": re-ordered hits with inliers and final_score, "compute_ms": time spent here}."""
        from serving.index import LocalFeatureStore, store_dir

        t = time.perf_counter()
        store = self.stores.get(collection)
        if store is None:
            store = self.stores[collection] = LocalFeatureStore(store_dir(collection))
        empty = (np.zeros((0, 2), np.uint16), np.zeros((0, store.dim or 1), np.int8), None)
        # an image deleted since the search stays in the list, with no inliers
        cands = [c if c is not None else empty for c in store.get_many([h["image_id"] for h in hits])]
        refine = self.reranker.cfg.refine != "none" and store.global_dim is not None
        r = self.reranker.rerank(q["keypoints"], q["descriptors"], cands,
                                 np.array([h["score"] for h in hits], np.float32),
                                 *((q["global"], store.global_many([h["image_id"] for h in hits])) if refine else ()))
        return {"hits": [{**hits[i], "inliers": int(r.inliers[i]), "final_score": float(r.scores[i]),
                          "recognition": float(r.recognition[i])} for i in r.order],
                "compute_ms": (time.perf_counter() - t) * 1000}


# ---------------------------------------------------------------------------------------------- HTTP

def _metrics():
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    reg = CollectorRegistry()
    buckets = (.005, .01, .025, .05, .1, .25, .5, 1, 2, 3, 5, 10)
    return reg, {
        "requests": Counter("ilr_requests", "Requests by endpoint and status", ["endpoint", "status"], registry=reg),
        "latency": Histogram("ilr_request_seconds", "Request latency", ["endpoint"], buckets=buckets, registry=reg),
        "stage": Histogram("ilr_stage_seconds", "Latency per stage", ["stage"], buckets=buckets, registry=reg),
        "inliers": Histogram("ilr_top1_inliers", "Inliers of the top result after re-ranking",
                             buckets=(0, 4, 8, 15, 30, 50, 70, 100, 200), registry=reg),
        "top1": Histogram("ilr_top1_score", "Global (cosine) score of the top result",
                          buckets=tuple(np.round(np.arange(0, 1.01, 0.1), 2)), registry=reg),
        "no_match": Counter("ilr_no_match", "Recognize answers below the threshold", registry=reg),
        "index_size": Gauge("ilr_index_images", "Images in the live index", registry=reg),
        "swaps": Counter("ilr_index_swaps", "Live index / model switches seen by the service", registry=reg),
    }


def make_api(cfg: ServeConfig | None = None):
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    api = FastAPI(title="ilr retrieval service", version="1",
                  description="Instance-level recognition: DELG global search in Milvus + local-feature "
                              "geometric re-ranking. Write endpoints need `Authorization: Bearer <token>`.")

    def err(status: int, code: str, message: str) -> JSONResponse:
        return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)

    @api.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return err(e.status, e.code, e.message)

    @api.middleware("http")
    async def _guard(request, call_next):
        if cfg is not None and not host_allowed(request.headers.get("host", ""), cfg):
            response = err(421, "misdirected_request", "this Host is not served here (serve.allowed_hosts)")
        else:
            response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_, e: StarletteHTTPException):
        return err(e.status_code, "http_error", str(e.detail))

    @api.exception_handler(RequestValidationError)
    async def _validation(_, e: RequestValidationError):
        return err(422, "invalid_request", "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()))

    return api


async def read_body(request, limit: int, timeout_s: float | None = None) -> bytes:
    """The whole body, or 413 past `limit` bytes, or 408 when it has not all arrived within `timeout_s` (a
    slow upload must not hold a slot of the Ingress for ever)."""
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_body(request, limit)
    except TimeoutError:
        raise ApiError(408, "body_timeout", f"the request body did not arrive within {timeout_s:g} s") from None


async def _read_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise ApiError(413, "body_too_large", f"request body of {int(declared)} bytes is over the "
                                                     f"limit of {limit} bytes")
        except ValueError:
            raise ApiError(400, "bad_content_length", "Content-Length is not a number") from None
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, "body_too_large", f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # Starlette re-reads the cached body for form parsing
    return body


def _as_bool(v, name: str) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ApiError(422, "invalid_parameter", f"{name} must be true or false, got {v!r}")


def _as_int(v, name: str) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        raise ApiError(422, "invalid_parameter", f"{name} must be an integer, got {v!r}") from None


async def parse_image_request(request, cfg: ServeConfig) -> tuple[bytes, dict]:
    """(image bytes, other fields) from multipart (field `image`) or JSON ({"image_base64": ...})."""
    body = await read_body(request, int(cfg.max_body_mb * 1e6), cfg.body_timeout_s)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    fields: dict = dict(request.query_params)
    if ctype == "multipart/form-data":
        try:
            form = await request.form()
        except Exception as e:
            raise ApiError(400, "bad_multipart", f"could not parse the multipart body: {e}") from None
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ApiError(422, "missing_image", "multipart field `image` (a file) is required")
        data = await upload.read()
        fields.update({k: v for k, v in form.items() if k != "image" and isinstance(v, str)})
    elif ctype == "application/json":
        try:
            payload = json.loads(body or b"null")
        except ValueError as e:
            raise ApiError(400, "bad_json", f"body is not valid JSON: {e}") from None
        except RecursionError:
            raise ApiError(400, "bad_json", "body is not valid JSON: nested too deeply") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("image_base64"), str):
            raise ApiError(422, "missing_image", "JSON body needs a string field `image_base64`")
        try:
            data = base64.b64decode(payload.pop("image_base64"), validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(422, "bad_base64", "`image_base64` is not valid base64") from None
        fields.update(payload)
    else:
        raise ApiError(415, "unsupported_media_type",
                       f"content type {ctype or '(none)'} is not supported: send multipart/form-data with a "
                       "file field `image`, or application/json with `image_base64`")
    if not data:
        raise ApiError(422, "empty_image", "the image is empty (0 bytes)")
    return data, fields


def decode_image(data: bytes, cfg: ServeConfig, max_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """(the image reduced to about what the extractor uses, original (width, height)): a 40 MP upload is
    never shipped whole to the Extractor."""
    from data.errors import ImageTooLarge
    from data.images import decode_scaled

    try:
        return decode_scaled(data, "image", max_side, max_pixels=cfg.max_pixels, min_side_px=cfg.min_side_px)
    except IlrError as e:
        raise ApiError(413 if isinstance(e, ImageTooLarge) else 422, "bad_image", e.what) from None


def bearer_ok(header: str, token: str) -> bool:
    """Authorization header `Bearer <token>`, compared in constant time on bytes (any header text, non-ASCII
    included, is a plain mismatch, not an error); an empty token never matches."""
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    return hmac.compare_digest(given.strip(" \t").encode("utf-8", "surrogateescape"), token.encode())


def host_allowed(host_header: str, cfg: ServeConfig) -> bool:
    """DNS rebinding guard: a page on another origin that resolves its name to 127.0.0.1 sends its own
    Host. Bound to loopback, only loopback names are answered; `serve.allowed_hosts` widens it."""
    allowed = set(cfg.allowed_hosts)
    if not allowed:
        if cfg.host not in ("127.0.0.1", "localhost", "::1"):
            return True  # bound to a routable address on purpose: the operator fronts it (allowed_hosts to pin)
        allowed = {"127.0.0.1", "localhost", "[::1]", "::1"}
    if "*" in allowed:
        return True
    host = host_header.strip().lower()
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") and "]:" in host else host
    return name in allowed


def build_app(cfg: ServeConfig | None = None, env: dict | None = None):
    """The bound Serve application (not yet running)."""
    from fastapi.responses import Response

    cfg = cfg or serve_config()
    env = env or current_env()
    api = make_api(cfg)
    body_doc = {"requestBody": {"content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary"}, "top_k": {"type": "integer", "maximum": cfg.max_top_k},
            "rerank": {"type": "boolean"}}}},
        "application/json": {"schema": {"type": "object", "required": ["image_base64"], "properties": {
            "image_base64": {"type": "string"}, "top_k": {"type": "integer"}, "rerank": {"type": "boolean"}}}}}}}
    add_doc = {"requestBody": {"content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["image", "image_id"], "properties": {
            "image": {"type": "string", "format": "binary"}, "image_id": {"type": "string"},
            "label": {"type": "string"}, "domain": {"type": "string"}}}}}}}

    opts = {"num_cpus": cfg.num_cpus}
    Extractor = serve.deployment(ExtractorWorker, name="Extractor", ray_actor_options={
        **opts, "num_gpus": cfg.extractor_gpus}, max_ongoing_requests=32)
    Searcher = serve.deployment(SearcherWorker, name="Searcher", ray_actor_options=opts, max_ongoing_requests=64)
    Reranker = serve.deployment(RerankerWorker, name="Reranker", ray_actor_options=opts, max_ongoing_requests=16)

    # the Ingress mostly waits (bodies, other stages): many requests at once are cheap there, and slow
    # uploads then cannot take every slot; the expensive part (decoding) has its own cap
    @serve.deployment(name="Ingress", ray_actor_options=opts, max_ongoing_requests=cfg.ingress_max_ongoing,
                      max_queued_requests=cfg.max_queued_requests)
    @serve.ingress(api)
    class Ingress:
        def __init__(self, extractor, searcher, reranker, env: dict, cfg: ServeConfig):
            apply_worker_env(env)
            self.extractor, self.searcher, self.reranker, self.cfg = extractor, searcher, reranker, cfg
            self.token = api_token()
            self.decodes = asyncio.Semaphore(max(1, cfg.max_decodes))
            from models.config import extract_config

            self.ship_side = extract_config().max_side_px  # the Extractor gets the image at about its own size
            self.registry, self.m = _metrics()
            self.state: dict | None = None
            self.checked = 0.0
            self.lock = asyncio.Lock()
            self.recent: collections.deque = collections.deque(maxlen=cfg.recent_embeddings)
            self.started = time.time()
            from models.config import rerank_config

            self.candidates = rerank_config().top_k  # the same top-K that evaluation and the gate re-rank

        async def _live(self) -> dict:
            if time.monotonic() - self.checked > self.cfg.poll_s:
                async with self.lock:
                    if time.monotonic() - self.checked > self.cfg.poll_s:
                        state = await self._call(self.searcher.live)
                        if state and (self.state is None or state["collection"] != self.state["collection"]):
                            await self._warm(state)  # model loaded and collection searched before switching
                            if self.state is not None:
                                self.m["swaps"].inc()
                            self.recent.clear()  # another model's descriptors are not comparable (drift)
                        self.state = state or self.state
                        self.checked = time.monotonic()
                        if self.state:
                            self.m["index_size"].set(self.state.get("count", 0))
            if self.state is None:
                raise ApiError(503, "no_index", "no live index yet: run `ilr index build --dataset NAME`")
            return self.state

        async def _warm(self, state: dict) -> None:
            await self._call(self.extractor.load, state["model"])
            probe = np.random.default_rng(0).integers(0, 255, (320, 320, 3), dtype=np.uint8)
            q = await self._call(self.extractor.extract, (state["model"], probe))
            hits = await self._call(self.searcher.search, state["collection"], q["global"], self.candidates)
            await self._call(self.reranker.rerank, state["collection"], q, hits)

        async def _call(self, method, *args):
            """One stage call. Every stage is idempotent (extract, search and re-rank read; add checks before
            it writes; delete of a deleted id is a no-op), so when the replica dies under the call it is
            retried on the replica Serve starts in its place, for up to `stage_retry_s`."""
            from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

            deadline, pause = time.monotonic() + self.cfg.stage_retry_s, 0.2
            while True:
                try:
                    return await method.remote(*args)
                except (RayActorError, ActorDiedError, ActorUnavailableError):
                    if time.monotonic() + pause > deadline:
                        raise
                    await asyncio.sleep(pause)
                    pause = min(2.0, pause * 2)

        def _auth(self, request: Request) -> None:
            if not bearer_ok(request.headers.get("authorization", ""), self.token):
                raise ApiError(401, "unauthorized", "this endpoint needs `Authorization: Bearer <token>` "
                                                    "(ILR_API_TOKEN or $ILR_HOME/api-token)")

        async def _decode(self, data: bytes, timings: dict) -> tuple[np.ndarray, tuple[int, int]]:
            t = time.perf_counter()
            async with self.decodes:  # at most max_decodes full-size images in memory at once
                out = await asyncio.to_thread(decode_image, data, self.cfg, self.ship_side)
            timings["decode_ms"] = (time.perf_counter() - t) * 1000
            return out

        async def _features(self, image: np.ndarray, size: tuple[int, int], state: dict, timings: dict) -> dict:
            t = time.perf_counter()
            q = await self._call(self.extractor.extract, (state["model"], image))
            timings["extract_ms"] = (time.perf_counter() - t) * 1000
            timings["extract_compute_ms"] = q.pop("compute_ms")  # the rest of extract_ms is queueing and transfer
            h, w = image.shape[:2]
            if (w, h) != tuple(size):  # keypoints in the original image's pixels, like the index's
                q["keypoints"] = q["keypoints"] * np.array([size[0] / w, size[1] / h], np.float32)
                q["size"] = tuple(size)
            return q

        async def _search(self, request: Request) -> dict:
            t0 = time.perf_counter()
            timings: dict[str, float] = {}
            data, fields = await parse_image_request(request, self.cfg)
            top_k = _as_int(fields.get("top_k", self.cfg.default_top_k), "top_k")
            if not 1 <= top_k <= self.cfg.max_top_k:
                raise ApiError(422, "invalid_parameter", f"top_k must be between 1 and {self.cfg.max_top_k}, "
                                                         f"got {top_k}")
            rerank = _as_bool(fields.get("rerank", True), "rerank")
            image, size = await self._decode(data, timings)
            state = await self._live()
            q = await self._features(image, size, state, timings)
            # a copy: the 2 KB view would keep the whole deserialised feature payload (~230 KB) alive
            self.recent.append(np.array(q["global"], dtype=np.float32, copy=True))
            t = time.perf_counter()
            hits = await self._call(self.searcher.search, state["collection"], q["global"],
                                    max(top_k, self.candidates) if rerank else top_k)
            timings["search_ms"] = (time.perf_counter() - t) * 1000
            if rerank and hits:
                t = time.perf_counter()
                reranked = await self._call(self.reranker.rerank, state["collection"], q, hits)
                timings["rerank_ms"] = (time.perf_counter() - t) * 1000
                hits, timings["rerank_compute_ms"] = reranked["hits"], reranked["compute_ms"]
            else:
                from models.rerank import recognition_score

                hits = [{**h, "inliers": None, "final_score": h["score"],
                         "recognition": float(recognition_score(np.zeros(1), np.array([h["score"]]))[0])} for h in hits]
            hits = hits[:top_k]
            timings["total_ms"] = (time.perf_counter() - t0) * 1000
            for k, v in timings.items():
                if k != "total_ms":
                    self.m["stage"].labels(k[:-3]).observe(v / 1000)
            if hits:
                self.m["top1"].observe(hits[0]["score"])
                if hits[0]["inliers"] is not None:
                    self.m["inliers"].observe(hits[0]["inliers"])
            return {"model": state["model"], "index": state["collection"], "dataset": state.get("dataset"),
                    "rerank": rerank, "timings_ms": {k: round(v, 2) for k, v in timings.items()},
                    "results": [{"rank": i + 1, "image_id": h["image_id"], "label": h["label"],
                                 "domain": h["domain"], "global_score": round(h["score"], 5),
                                 "inliers": h["inliers"], "score": round(h["final_score"], 5),
                                 "recognition_score": round(h["recognition"], 5)}
                                for i, h in enumerate(hits)]}

        async def _measure(self, endpoint: str, coro):
            t = time.perf_counter()
            status = 500
            try:
                out = await coro
                status = 200
                return out
            except ApiError as e:
                status = e.status
                raise
            finally:
                self.m["requests"].labels(endpoint, str(status)).inc()
                self.m["latency"].labels(endpoint).observe(time.perf_counter() - t)

        @api.post("/v1/search", openapi_extra=body_doc, summary="Ranked matches for a query image")
        async def search(self, request: Request):
            return await self._measure("search", self._search(request))

        @api.post("/v1/recognize", openapi_extra=body_doc, summary="Recognised label (or no match), GLDv2 style")
        async def recognize(self, request: Request):
            async def run():
                res = await self._search(request)
                top = res["results"][0] if res["results"] else None
                from data.config import NO_LABEL

                confidence = top["recognition_score"] if top else 0.0
                matched = top is not None and confidence >= self.cfg.no_match_threshold and top["label"] != NO_LABEL
                if not matched:
                    self.m["no_match"].inc()
                return {"match": matched, "label": top["label"] if matched else None,
                        "confidence": confidence, "threshold": self.cfg.no_match_threshold,
                        "best": top, "model": res["model"], "index": res["index"], "timings_ms": res["timings_ms"]}
            return await self._measure("recognize", run())

        async def _change_log(self, state: dict):
            from serving.changes import ChangeLog

            name = state.get("dataset_name") or str(state.get("dataset", "")).partition("@")[0]
            if not name:
                raise ApiError(503, "no_dataset", f"the live index {state['collection']} records no dataset")
            return await asyncio.to_thread(ChangeLog, name)

        async def _on_live(self, state: dict, apply) -> dict:
            """Apply a change to the live collection, then re-read the alias: when a swap moved it meanwhile,
            apply it there too (the build replays the change log once more after its swap, so together no
            change is lost in the gap). Returns the state the change landed in."""
            for _ in range(5):
                await apply(state)
                fresh = await self._call(self.searcher.live)
                if not fresh or fresh["collection"] == state["collection"]:
                    return state
                state = fresh
            return state

        @api.post("/v1/index/images", status_code=201, openapi_extra=add_doc, summary="Add an image to the live index")
        async def add_image(self, request: Request):
            async def run():
                from data.manifest import check_image_id
                from fastapi.responses import JSONResponse

                from serving.changes import Conflict

                self._auth(request)
                data, fields = await parse_image_request(request, self.cfg)
                try:
                    image_id = check_image_id(fields.get("image_id"), "image_id")
                except IlrError as e:
                    raise ApiError(422, "bad_image_id", e.what) from None
                label = str(fields.get("label") or "__none__")[:256]
                domain = str(fields.get("domain") or "other")[:32]
                image, size = await self._decode(data, {})  # a bad image is refused before anything is logged
                state = await self._live()
                log = await self._change_log(state)
                try:
                    last = await asyncio.to_thread(log.last, image_id)
                    retried = last is not None and last.op == "add"
                    if not retried and await self._call(self.searcher.exists, state["collection"], image_id):
                        raise ApiError(409, "duplicate_id", f"image_id {image_id!r} is already in the index "
                                                            f"(DELETE it first to replace it)")
                    try:  # written ahead: every later build replays it
                        _, new = await asyncio.to_thread(log.record_add, image_id, label, domain, data)
                    except Conflict as e:
                        raise ApiError(409, "duplicate_id", f"{e} (DELETE it first to replace it)") from None
                finally:
                    log.close()

                async def apply(st: dict) -> None:
                    q = await self._features(image, size, st, {})
                    await self._call(self.searcher.add, st["collection"], image_id, label, domain, q)

                state = await self._on_live(state, apply)
                body = {"image_id": image_id, "label": label, "domain": domain, "index": state["collection"]}
                return body if new else JSONResponse(body, status_code=200)  # a retried add: already there
            return await self._measure("index_add", run())

        @api.delete("/v1/index/images/{image_id}", summary="Remove an image from the live index")
        async def delete_image(self, image_id: str, request: Request):
            async def run():
                from data.manifest import check_image_id

                self._auth(request)
                try:
                    check_image_id(image_id, "image_id")
                except IlrError as e:
                    raise ApiError(422, "bad_image_id", e.what) from None
                state = await self._live()
                if not await self._call(self.searcher.exists, state["collection"], image_id):
                    raise ApiError(404, "not_found", f"image_id {image_id!r} is not in the live index")
                log = await self._change_log(state)
                try:
                    await asyncio.to_thread(log.record_delete, image_id)  # a takedown survives every rebuild
                finally:
                    log.close()

                async def apply(st: dict) -> None:
                    await self._call(self.searcher.delete, st["collection"], image_id)

                state = await self._on_live(state, apply)
                return {"deleted": image_id, "index": state["collection"]}
            return await self._measure("index_delete", run())

        @api.get("/healthz", summary="Liveness plus the model and index versions served now")
        async def healthz(self):
            from models import registry

            try:
                state = await self._live()
            except ApiError as e:
                return {"status": "no_index", "message": e.message}
            champion = await asyncio.to_thread(registry.alias_version, "champion")
            live_model = state["model"]
            return {"status": "ok", "model": live_model, "index": state["collection"],
                    "dataset": state.get("dataset"), "images": state.get("count"),
                    "champion": f"models:/{registry.model_name()}/{champion}" if champion else None,
                    "champion_pending_index": bool(champion) and not live_model.endswith(f"/{champion}"),
                    "uptime_s": round(time.time() - self.started, 1)}

        @api.get("/metrics", summary="Prometheus metrics")
        async def metrics(self):
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

        @api.get("/v1/monitoring/embeddings", summary="Recent query descriptors and an index sample (for drift)")
        async def embeddings(self, request: Request, n: int = 500):
            self._auth(request)
            if not 1 <= n <= self.cfg.max_embeddings:
                raise ApiError(422, "invalid_parameter", f"n must be between 1 and {self.cfg.max_embeddings}, got {n}")
            state = await self._live()
            sample = await self._call(self.searcher.index_sample, state["collection"], n)
            dim = sample.shape[1] if sample.ndim == 2 else None
            recent = [v for v in list(self.recent)[-n:] if dim is None or len(v) == dim]
            return {"index": state["collection"], "queries": [v.round(5).tolist() for v in recent],
                    "index_sample": sample.round(5).tolist()}

    return Ingress.bind(Extractor.bind(env, cfg), Searcher.bind(env, cfg), Reranker.bind(env, cfg), env, cfg)
