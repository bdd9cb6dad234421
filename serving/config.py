"""Settings of the retrieval service (params.yaml `serve`, overridable per call)."""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field

from data.config import check_ranges, from_params, ilr_home


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"             # loopback unless asked otherwise
    port: int = 8000
    max_body_mb: float = 20.0           # request bodies above this get 413
    max_pixels: int = 40_000_000        # decompression-bomb guard (width x height)
    min_side_px: int = 32               # smaller images get 422
    max_top_k: int = 100
    default_top_k: int = 10
    no_match_threshold: float = 0.3     # recognition score min(70, inliers)/70 + 0.25 cos below this -> no match
    batch_size: int = 8                 # extractor micro-batch on GPU
    cpu_extractions: int = 2            # on CPU: extractions at once, one thread each (BENCHMARKS.md)
    cpu_extract_threads: int = 0        # on CPU: threads per extraction; 0 = cores / cpu_extractions
    batch_wait_s: float = 0.01
    poll_s: float = 1.0                 # how often the live index (alias) and champion are re-read
    num_cpus: float = 0.25              # per replica: 4 deployments fit on 2 cores (facts.md)
    extractor_gpus: float = 0.0         # > 0 on clusters with GPUs
    recent_embeddings: int = 1000       # query descriptors kept for drift monitoring
    max_embeddings: int = 2000          # most vectors /v1/monitoring/embeddings returns per list
    max_match_results: int = 10         # results that get their correspondences with return_matches=true
    app_name: str = "ilr"
    # hardening: a cheap request must not exhaust the service
    allowed_hosts: tuple[str, ...] = ()  # Host headers accepted; () = loopback names when bound to loopback, else any
    max_decodes: int = 2                # image decodes at once in the Ingress (a 40 MP PNG is 120 MB decoded)
    body_timeout_s: float = 20.0        # a request body must arrive within this (slow uploads get 408)
    request_timeout_s: float = 120.0    # Serve's end-to-end limit per request
    ingress_max_ongoing: int = 512      # requests the Ingress holds at once (mostly waiting on I/O: cheap)
    max_queued_requests: int = 256      # beyond ongoing + queued, Serve answers 503 at once
    stage_retry_s: float = 60.0         # a stage whose replica died is retried on its restarted replica this long
    # on a Ray cluster: Serve's HTTP proxy on the head node only (one URL), or "EveryNode" behind a balancer
    proxy_location: str = "HeadOnly"
    # per deployment (Ingress, Extractor, Searcher, Reranker): Serve options over the defaults above, e.g.
    # {"Reranker": {"num_replicas": 2, "max_replicas_per_node": 1}, "Extractor": {"resources": {"gpu_box": 1}}}
    # (keys: num_replicas, max_replicas_per_node, num_cpus, num_gpus, resources = custom Ray resources)
    deployments: dict = field(default_factory=dict)

    def __post_init__(self):
        check_ranges("serve", self, {"port": 1, "max_top_k": 1, "default_top_k": 1, "min_side_px": 1,
                                     "cpu_extractions": 1, "cpu_extract_threads": 0, "max_decodes": 1},
                     positive=("max_body_mb", "max_pixels", "num_cpus", "body_timeout_s", "request_timeout_s"),
                     at_most={"port": 65535, "default_top_k": self.max_top_k})


@dataclass
class IndexConfig:
    index_type: str = "HNSW"
    hnsw_m: int = 16
    ef_construction: int = 200
    ef_search: int = 128
    alias: str = "ilr_live"
    min_recall: float = 0.95          # ANN recall@k against exact search needed to move the alias
    recall_k: int = 100
    recall_queries: int = 200
    chunk: int = 64                   # images extracted and inserted per step
    engine: str = "auto"              # ray | local | auto (Ray Data on a Ray cluster or with GPUs: choose_engine)
    actors: int = 0                   # Ray engine's extraction actors; 0 = one per GPU, else one per node with CPUs

    def __post_init__(self):
        check_ranges("index", self, {"hnsw_m": 2, "ef_construction": 1, "ef_search": 1, "recall_k": 1,
                                     "recall_queries": 1, "chunk": 1, "actors": 0})


def index_config(**kw) -> IndexConfig:
    return from_params(IndexConfig, "index", **kw)


def serve_config(**kw) -> ServeConfig:
    return from_params(ServeConfig, "serve", **kw)


MIN_TOKEN_CHARS = 16


def api_token() -> str:
    """Bearer token of the write endpoints: ILR_API_TOKEN, else one generated once into $ILR_HOME/api-token
    (0600, written atomically). A blank or short token is refused, never used: an empty token would open
    the write endpoints to anyone."""
    token = os.environ.get("ILR_API_TOKEN")
    if token is not None:
        return _checked_token(token, "ILR_API_TOKEN")
    path = ilr_home() / "api-token"
    if path.exists() and not path.read_text().strip():  # a crash or a full disk right after creating it
        path.unlink()
    if not path.exists():
        tmp = path.with_name(f".api-token.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32))
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # atomic, and never replaces a token another process wrote meanwhile
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return _checked_token(path.read_text(), str(path))


def _checked_token(token: str, where: str) -> str:
    from data.errors import IlrError

    token = token.strip()
    if len(token) < MIN_TOKEN_CHARS or not token.isascii() or not token.isprintable() or " " in token:
        raise IlrError(f"the API token must be at least {MIN_TOKEN_CHARS} printable ASCII characters without "
                       "spaces", where=where, hint="delete the file to get a new one, or set ILR_API_TOKEN")
    return token
