"""Settings of the retrieval service (params.yaml `serve`, overridable per call)."""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

from data.config import from_params, ilr_home


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
    app_name: str = "ilr"


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


def index_config(**kw) -> IndexConfig:
    return from_params(IndexConfig, "index", **kw)


def serve_config(**kw) -> ServeConfig:
    return from_params(ServeConfig, "serve", **kw)


def api_token() -> str:
    """Bearer token of the write endpoints: ILR_API_TOKEN, else one generated once into $ILR_HOME/api-token."""
    if os.environ.get("ILR_API_TOKEN"):
        return os.environ["ILR_API_TOKEN"]
    path = ilr_home() / "api-token"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32))
    return path.read_text().strip()
