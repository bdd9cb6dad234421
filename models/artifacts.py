"""A model on disk: weights.pt (state_dict, loaded with weights_only=True) and config.json. No pickled objects."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from data.config import DEFAULT_MODEL_NAME
from data.errors import IlrError
from models.config import ModelConfig, model_config
from models.delg import DELG

WEIGHTS, CONFIG = "weights.pt", "config.json"


def save(model: DELG, folder: Path, extra: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.inference_state(), folder / WEIGHTS)
    meta = {"model": asdict(model.cfg), "off_the_shelf": model.off_the_shelf, **(extra or {})}
    (folder / CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return folder


def load(folder: Path, device: str = "cpu") -> DELG:
    folder = Path(folder)
    try:
        meta = json.loads((folder / CONFIG).read_text())
        state = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise IlrError(f"not a model folder: {e.filename} is missing", where=str(folder)) from None
    cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["model"].items()})
    model = DELG(cfg, load_pretrained=False, off_the_shelf=meta.get("off_the_shelf", False))
    model.load_state_dict(state, strict=True)
    return model.eval().to(device)


def off_the_shelf(cfg: ModelConfig | None = None) -> DELG:
    """The ImageNet backbone with GeM (and feature-norm attention for local features): always available.
    Its unused heads are seeded, so the same model (and weights hash) comes out every time."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return DELG(cfg or model_config(), off_the_shelf=True).eval()


REGISTERED_MODEL = DEFAULT_MODEL_NAME


def download(uri: str) -> Path:
    """Fetch an MLflow model or artifact URI (runs:/, models:/, ...) and return the folder holding our
    weights + config inside it."""
    import mlflow

    from models import tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    try:
        root = Path(mlflow.artifacts.download_artifacts(uri))
    except Exception as e:
        raise IlrError(f"cannot fetch model {uri!r}: {e}") from None
    found = sorted(root.rglob(CONFIG))
    if not found:
        raise IlrError(f"model {uri!r} holds no {CONFIG}")
    return found[0].parent
