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
import collections
import time

import numpy as np
from fastapi import Request
from fastapi.responses import Response
from ray import serve

from data.config import apply_worker_env
from data.errors import IlrError
from serving.config import ServeConfig, api_token, serve_config
from serving.http import (ApiError, as_bool, as_int, bearer_ok, checked_id, decode_image, make_api, metrics,
                          parse_image_request)
from serving.workers import ExtractorWorker, RerankerWorker, SearcherWorker, current_env

api = make_api()
_QUERY_FIELDS = {"top_k": {"type": "integer", "minimum": 1}, "rerank": {"type": "boolean"},
                 "return_matches": {"type": "boolean"},
                 "image_id": {"type": "string", "description": "instead of an image: search with this index "
                                                              "image's stored features (it is left out of the results)"}}
BODY_DOC = {"requestBody": {"content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "image": {"type": "string", "format": "binary"}, **_QUERY_FIELDS}}},
    "application/json": {"schema": {"type": "object", "properties": {
        "image_base64": {"type": "string"}, **_QUERY_FIELDS}}}}}}
ADD_DOC = {"requestBody": {"content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image", "image_id"], "properties": {
        "image": {"type": "string", "format": "binary"}, "image_id": {"type": "string"},
        "label": {"type": "string"}, "domain": {"type": "string"}}}}}}}


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, extractor, searcher, reranker, env: dict, cfg: ServeConfig):
        apply_worker_env(env)
        self.extractor, self.searcher, self.reranker, self.cfg = extractor, searcher, reranker, cfg
        self.token = api_token()
        self.decodes = asyncio.Semaphore(max(1, cfg.max_decodes))
        from models.config import extract_config

        self.ship_side = extract_config().max_side_px  # the Extractor gets the image at about its own size
        self.registry, self.m = metrics()
        api.state.cfg = cfg  # the Host check of make_api
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
        data, fields = await parse_image_request(request, self.cfg, by_id=True)
        top_k = as_int(fields.get("top_k", self.cfg.default_top_k), "top_k")
        if not 1 <= top_k <= self.cfg.max_top_k:
            raise ApiError(422, "invalid_parameter", f"top_k must be between 1 and {self.cfg.max_top_k}, "
                                                     f"got {top_k}")
        rerank = as_bool(fields.get("rerank", True), "rerank")
        # correspondences of the first results, for the search page and `ilr query --show` (costs a second
        # matching of those few candidates; nothing without it)
        with_matches = min(top_k, self.cfg.max_match_results) if as_bool(
            fields.get("return_matches", False), "return_matches") else 0
        example = fields.get("image_id") if data is None else None
        if example is None:
            image, size = await self._decode(data, timings)
            state = await self._live()
            q = await self._features(image, size, state, timings)
            # a copy: the 2 KB view would keep the whole deserialised feature payload (~230 KB) alive
            self.recent.append(np.array(q["global"], dtype=np.float32, copy=True))
        else:  # an index image as the query: its stored features, no decoding or extraction
            state = await self._live()
            t = time.perf_counter()
            q = await self._call(self.searcher.stored_query, state["collection"], example)
            if q is None:
                raise ApiError(404, "not_found", f"image_id {example!r} is not in the live index")
            timings["lookup_ms"] = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        want = max(top_k, self.candidates) if rerank else top_k
        hits = await self._call(self.searcher.search, state["collection"], q["global"], want + (example is not None))
        hits = [h for h in hits if h["image_id"] != example][:want]  # an example is not its own result
        timings["search_ms"] = (time.perf_counter() - t) * 1000
        if rerank and hits:
            t = time.perf_counter()
            reranked = await self._call(self.reranker.rerank, state["collection"], q, hits, with_matches)
            timings["rerank_ms"] = (time.perf_counter() - t) * 1000
            hits, timings["rerank_compute_ms"] = reranked["hits"], reranked["compute_ms"]
        else:
            from models.features import recognition_score

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
                             "recognition_score": round(h["recognition"], 5),
                             **({"matches": h["matches"], "size": h["size"]} if "matches" in h else {})}
                            for i, h in enumerate(hits)],
                **({"query_size": list(q["size"])} if with_matches else {})}

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

    @api.post("/v1/search", openapi_extra=BODY_DOC, summary="Ranked matches for a query image")
    async def search(self, request: Request):
        return await self._measure("search", self._search(request))

    @api.post("/v1/recognize", openapi_extra=BODY_DOC, summary="Recognised label (or no match), GLDv2 style")
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

    @api.post("/v1/index/images", status_code=201, openapi_extra=ADD_DOC, summary="Add an image to the live index")
    async def add_image(self, request: Request):
        async def run():
            from fastapi.responses import JSONResponse

            from serving.changes import Conflict

            self._auth(request)
            data, fields = await parse_image_request(request, self.cfg)
            image_id = checked_id(fields.get("image_id"))
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

            from data.images import thumbnail_jpeg

            thumb = await asyncio.to_thread(thumbnail_jpeg, image)

            async def apply(st: dict) -> None:
                q = await self._features(image, size, st, {})
                await self._call(self.searcher.add, st["collection"], image_id, label, domain, q, thumb)

            state = await self._on_live(state, apply)
            body = {"image_id": image_id, "label": label, "domain": domain, "index": state["collection"]}
            return body if new else JSONResponse(body, status_code=200)  # a retried add: already there
        return await self._measure("index_add", run())

    @api.delete("/v1/index/images/{image_id}", summary="Remove an image from the live index")
    async def delete_image(self, image_id: str, request: Request):
        async def run():
            self._auth(request)
            checked_id(image_id)
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

    @api.get("/v1/index/images", summary="A sample of the live index's images (the search page's examples)")
    async def list_images(self, limit: int = 12):
        if not 1 <= limit <= self.cfg.max_top_k:
            raise ApiError(422, "invalid_parameter", f"limit must be between 1 and {self.cfg.max_top_k}, got {limit}")
        state = await self._live()
        images = await self._call(self.searcher.examples, state["collection"], limit)
        return {"index": state["collection"], "images": images}

    @api.get("/v1/index/images/{image_id}/thumbnail", summary="A small JPEG of an index image")
    async def thumbnail(self, image_id: str):
        checked_id(image_id)
        state = await self._live()
        jpeg = await self._call(self.searcher.thumbnail, state["collection"], image_id)
        if jpeg is None:
            raise ApiError(404, "not_found", f"no thumbnail of {image_id!r} in the live index")
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=300"})

    @api.get("/ui", include_in_schema=False)
    @api.get("/ui/", include_in_schema=False)
    async def ui_page(self):
        from serving import ui

        return Response(ui.PAGE, media_type="text/html; charset=utf-8", headers={"Content-Security-Policy": ui.CSP})

    @api.get("/ui/app.js", include_in_schema=False)
    async def ui_script(self):
        from serving import ui

        return Response(ui.SCRIPT, media_type="text/javascript; charset=utf-8")

    @api.get("/ui/app.css", include_in_schema=False)
    async def ui_style(self):
        from serving import ui

        return Response(ui.STYLE, media_type="text/css; charset=utf-8")

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
                "champion": registry.ref(champion) if champion else None,
                "champion_pending_index": bool(champion) and registry.version_of(live_model) != champion,
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


DEPLOYMENTS = ("Ingress", "Extractor", "Searcher", "Reranker")
_ACTOR_KEYS = ("num_cpus", "num_gpus", "resources")
_SERVE_KEYS = ("num_replicas", "max_replicas_per_node")


def deployment_options(cfg: ServeConfig, name: str, actor: dict, **serve_opts) -> dict:
    """Serve options of one deployment: ilr's defaults, then params' `serve.deployments[name]` (replicas,
    one replica per node, CPUs, GPUs, custom resources that pin it to nodes)."""
    unknown = set(cfg.deployments) - set(DEPLOYMENTS)
    if unknown:
        raise IlrError(f"serve.deployments: unknown deployment(s) {sorted(unknown)}", hint=f"one of {DEPLOYMENTS}")
    over = dict(cfg.deployments.get(name) or {})
    bad = set(over) - set(_ACTOR_KEYS) - set(_SERVE_KEYS)
    if bad:
        raise IlrError(f"serve.deployments.{name}: unknown option(s) {sorted(bad)}",
                       hint=f"one of {_ACTOR_KEYS + _SERVE_KEYS}")
    actor = {**actor, **{k: over[k] for k in _ACTOR_KEYS if k in over}}
    return {**serve_opts, **{k: over[k] for k in _SERVE_KEYS if k in over}, "ray_actor_options": actor}


def build_app(cfg: ServeConfig | None = None, env: dict | None = None):
    """The bound Serve application (not yet running)."""
    cfg = cfg or serve_config()
    env = env or current_env()
    opts = {"num_cpus": cfg.num_cpus}
    extractor = serve.deployment(ExtractorWorker, name="Extractor", **deployment_options(
        cfg, "Extractor", {**opts, "num_gpus": cfg.extractor_gpus}, max_ongoing_requests=32))
    searcher = serve.deployment(SearcherWorker, name="Searcher", **deployment_options(
        cfg, "Searcher", opts, max_ongoing_requests=64))
    reranker = serve.deployment(RerankerWorker, name="Reranker", **deployment_options(
        cfg, "Reranker", opts, max_ongoing_requests=16))
    # the Ingress mostly waits (bodies, other stages): many requests at once are cheap there, and slow
    # uploads then cannot take every slot; the expensive part (decoding) has its own cap
    ingress = Ingress.options(**deployment_options(cfg, "Ingress", opts, max_ongoing_requests=cfg.ingress_max_ongoing,
                                                   max_queued_requests=cfg.max_queued_requests))
    return ingress.bind(extractor.bind(env, cfg), searcher.bind(env, cfg), reranker.bind(env, cfg), env, cfg)
