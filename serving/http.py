"""HTTP of the service, testable without Ray: the error model, body reading and parsing, image decoding
for queries, the bearer and Host checks, and the Prometheus metrics."""
from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json

import numpy as np

from data.errors import IlrError
from serving.config import ServeConfig


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        self.status, self.code, self.message = status, code, message
        super().__init__(message)


def metrics():
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


def make_api():
    """The FastAPI app: errors as {"error": {"code", "message"}}, the Host check (serve config in
    `app.state.cfg`, set by the Ingress) and security headers on every answer."""
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
        cfg = getattr(request.app.state, "cfg", None)
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


def as_bool(v, name: str) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ApiError(422, "invalid_parameter", f"{name} must be true or false, got {v!r}")


def as_int(v, name: str) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        raise ApiError(422, "invalid_parameter", f"{name} must be an integer, got {v!r}") from None


def checked_id(image_id, name: str = "image_id") -> str:
    """The id, when it is safe in file names and URLs; else a 422 naming `name`."""
    from data.manifest import check_image_id

    try:
        return check_image_id(image_id, name)
    except IlrError as e:
        raise ApiError(422, "bad_image_id", e.what) from None


async def parse_image_request(request, cfg: ServeConfig, by_id: bool = False) -> tuple[bytes | None, dict]:
    """(image bytes, other fields) from multipart (field `image`) or JSON ({"image_base64": ...}). With
    `by_id`, a request may name an index image instead (`image_id`, as a field or a query parameter, and no
    image): then the bytes are None and fields["image_id"] is a checked, safe id."""
    body = await read_body(request, int(cfg.max_body_mb * 1e6), cfg.body_timeout_s)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    fields: dict = dict(request.query_params)
    data: bytes | None = None
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):  # (a URL-encoded form has no file)
        try:
            form = await request.form()
        except Exception as e:
            raise ApiError(400, "bad_multipart", f"could not parse the multipart body: {e}") from None
        upload = form.get("image")
        fields.update({k: v for k, v in form.items() if k != "image" and isinstance(v, str)})
        if upload is not None and not isinstance(upload, str):
            data = await upload.read()
        missing = "multipart field `image` (a file) is required"
    elif ctype == "application/json":
        try:
            payload = json.loads(body or b"null")
        except ValueError as e:
            raise ApiError(400, "bad_json", f"body is not valid JSON: {e}") from None
        except RecursionError:
            raise ApiError(400, "bad_json", "body is not valid JSON: nested too deeply") from None
        missing = "JSON body needs a string field `image_base64`"
        if not isinstance(payload, dict) or ("image_base64" in payload and not isinstance(payload["image_base64"], str)):
            raise ApiError(422, "missing_image", missing)
        if "image_base64" in payload:
            try:
                data = base64.b64decode(payload.pop("image_base64"), validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(422, "bad_base64", "`image_base64` is not valid base64") from None
        fields.update(payload)
    elif body or not (by_id and "image_id" in fields):
        raise ApiError(415, "unsupported_media_type",
                       f"content type {ctype or '(none)'} is not supported: send multipart/form-data with a "
                       "file field `image`, or application/json with `image_base64`")
    else:
        missing = ""
    if by_id and "image_id" in fields:
        if data is not None:
            raise ApiError(422, "invalid_parameter", "send either an image or `image_id` (an index image), not both")
        checked_id(fields["image_id"])
        return None, fields
    if data is None:
        raise ApiError(422, "missing_image", missing + (" (or `image_id`, to search with an index image)" if by_id else ""))
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
