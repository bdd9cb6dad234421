"""The model registry on MLflow aliases: challenger -> (quality gate) -> champion, previous, rollback.

Stages are deprecated in MLflow; aliases are used instead. On the SQL store `search_model_versions()`
returns empty `aliases`, so aliases are read with `get_model_version_by_alias()`. Every decision is
recorded as tags on the model version it concerns.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from data.config import quiet_libraries
from data.errors import IlrError
from models import artifacts, tracking
from models.delg import DELG

ALIASES = ("champion", "challenger", "previous")
METRIC_TAGS = ("eval.map", "eval.global_map", "eval.rerank_map")  # on the gate's target dataset


def model_name() -> str:
    return os.environ.get("ILR_MODEL_NAME", artifacts.REGISTERED_MODEL)


def client():
    quiet_libraries()
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking.tracking_uri())
    return MlflowClient()


def log_model(model: DELG, folder: Path, extra: dict | None = None):
    """Log a DELG model in the active run: weights + config (our format) inside an MLflow pyfunc model
    (models-from-code, with a signature). Returns MLflow's ModelInfo."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    folder = artifacts.save(model, folder, extra)
    dim = model.descriptor_dim
    signature = ModelSignature(inputs=Schema([ColSpec("binary", "image")]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, dim))]))
    return mlflow.pyfunc.log_model(name="model", python_model=str(Path(__file__).with_name("mlflow_model.py")),
                                   artifacts={"delg": str(folder)}, signature=signature,
                                   pip_requirements=["torch", "timm", "numpy", "pandas", "pillow", "opencv-python-headless"])


def register(model_uri: str, tags: dict | None = None, alias: str | None = "challenger") -> str:
    """Register a logged model under the model name; tag it and set `alias`. Returns the version.
    Idempotent per training run: a model whose `train_run_id` is registered already (a re-run that resumed
    a finished search) keeps its version instead of getting a new one."""
    import mlflow

    c = client()
    version = _version_of_run(tags.get("train_run_id")) if tags and tags.get("train_run_id") else None
    if version is None:
        version = str(mlflow.register_model(model_uri, model_name()).version)
        for k, v in (tags or {}).items():
            c.set_model_version_tag(model_name(), version, k, str(v))
    if alias:
        c.set_registered_model_alias(model_name(), alias, version)
    return version


def register_trained(model_uri: str, dataset, train_run_id: str, kind: str, **tags) -> str:
    """Register a model trained on a dataset version (a data.versioning.Version) as challenger, with the
    lineage tags every trained model carries: dataset, version, DVC hash, git commit, training run."""
    from models import tracking

    return register(model_uri, {"dataset": dataset.name, "dataset.version": dataset.version,
                                "dataset.dvc_md5": dataset.dvc_md5, "git_sha": tracking.git_sha(),
                                "train_run_id": train_run_id, "kind": kind, **tags})


def _version_of_run(train_run_id: str) -> str | None:
    try:
        found = client().search_model_versions(f"name='{model_name()}' and run_id='{train_run_id}'")
    except Exception:
        return None
    return str(min(int(m.version) for m in found)) if found else None


def alias_version(alias: str) -> str | None:
    try:
        return str(client().get_model_version_by_alias(model_name(), alias).version)
    except Exception:
        return None


def aliases() -> dict[str, str]:
    """{alias: version} for the aliases ilr uses."""
    return {a: v for a in ALIASES if (v := alias_version(a))}


def model_dir(uri: str) -> Path:
    client()
    return artifacts.download(uri)


def ref(version_or_alias: str) -> str:
    """The reference of a version (`models:/NAME/3`) or an alias (`models:/NAME@champion`) of this registry's
    model; version_of() reads a version back."""
    v = str(version_or_alias)
    return f"models:/{model_name()}/{v}" if v.isdigit() else f"models:/{model_name()}@{v}"


def load(alias_or_version: str = "champion", device: str = "cpu") -> tuple[DELG, str]:
    uri = ref(alias_or_version)
    return artifacts.load(model_dir(uri), device), uri


def check_model_uri(model_uri: str) -> str:
    """Models come from this workspace: its registry (`models:/...`), its tracking server's runs (`runs:/...`)
    or a local folder. Any other scheme (http, s3, a `models:/` on another server...) is refused, so a flow
    parameter cannot make the service load weights from elsewhere."""
    import re

    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", model_uri)
    if scheme and not (model_uri.startswith(("models:/", "runs:/")) and "://" not in model_uri):
        raise IlrError(f"model {model_uri!r}: only this workspace's registry is used",
                       hint="models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/PATH, off-the-shelf or a local "
                            "folder")
    return model_uri


def resolve(model_uri: str | None, device: str = "cpu") -> tuple[DELG, str]:
    """A model and where it came from. None -> the current champion as `models:/NAME/<version>` (a
    concrete version, so callers can tell models apart), else the off-the-shelf ImageNet model;
    "off-the-shelf"; a folder; or an MLflow URI."""
    if model_uri is None:
        version = alias_version("champion")
        if version is None:
            return artifacts.off_the_shelf().to(device), "off-the-shelf"
        model_uri = ref(version)
    if model_uri == "off-the-shelf":
        return artifacts.off_the_shelf().to(device), "off-the-shelf"
    check_model_uri(model_uri)
    if Path(model_uri).exists():
        return artifacts.load(Path(model_uri), device), str(model_uri)
    return artifacts.load(model_dir(model_uri), device), model_uri


def version_of(model_uri: str) -> str | None:
    """The registered version behind `models:/NAME/V` of this registry's model, else None."""
    prefix = f"models:/{model_name()}/"
    rest = model_uri[len(prefix):] if model_uri.startswith(prefix) else ""
    return rest if rest.isdigit() else None


def tag(version: str, tags: dict) -> None:
    c = client()
    for k, v in tags.items():
        c.set_model_version_tag(model_name(), version, k, str(v))


def promote(version: str, reason: str = "manual promotion") -> dict:
    """Make `version` the champion; the champion it replaces becomes `previous`."""
    c = client()
    current = alias_version("champion")
    c.get_model_version(model_name(), version)  # raises for an unknown version
    if current == str(version):
        return {"champion": current, "previous": alias_version("previous"), "changed": False}
    if current:
        c.set_registered_model_alias(model_name(), "previous", current)
    c.set_registered_model_alias(model_name(), "champion", str(version))
    if alias_version("challenger") == str(version):
        c.delete_registered_model_alias(model_name(), "challenger")
    tag(str(version), {"promoted_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "promotion.reason": reason,
                        "promotion.replaced": current or ""})
    return {"champion": str(version), "previous": current, "changed": True}


def rollback() -> dict:
    """Swap champion and previous: the previous champion serves again (run it twice to undo)."""
    c = client()
    current, previous = alias_version("champion"), alias_version("previous")
    if not previous:
        raise IlrError("no previous champion to roll back to")
    c.set_registered_model_alias(model_name(), "champion", previous)
    if current:
        c.set_registered_model_alias(model_name(), "previous", current)
        tag(current, {"rolled_back_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return {"champion": previous, "previous": current}


def versions() -> list[dict]:
    """One row per version: version, aliases, key metrics, data version, run, created."""
    c = client()
    try:
        found = c.search_model_versions(f"name='{model_name()}'")
    except Exception:
        return []
    by_version: dict[str, list[str]] = {}
    for a, v in aliases().items():
        by_version.setdefault(v, []).append(a)
    rows = []
    for mv in sorted(found, key=lambda m: int(m.version)):
        t = mv.tags or {}
        rows.append({"version": str(mv.version), "aliases": ",".join(by_version.get(str(mv.version), [])),
                     **{k: t.get(k, "") for k in METRIC_TAGS}, "dataset": t.get("dataset", ""),
                     "dataset_dvc_md5": t.get("dataset.dvc_md5", ""), "kind": t.get("kind", ""),
                     "gate": t.get("gate.decision", ""), "run_id": mv.run_id or "",
                     "suites": {k[5:-11]: t[k] for k in sorted(t) if k.startswith("eval.") and k.endswith(".served_map")},
                     "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(mv.creation_timestamp / 1000))})
    return rows


def ensure_champion(log_fn=print) -> str:
    """There is always a model to serve: register the off-the-shelf ImageNet model as the first champion."""
    import mlflow

    if v := alias_version("champion"):
        return v
    tracking.setup("ilr-registry")
    with mlflow.start_run(run_name="off-the-shelf baseline") as run:
        model = artifacts.off_the_shelf()
        info = log_model(model, Path(tracking.ilr_home()) / "models" / "off-the-shelf",
                         {"kind": "off-the-shelf"})
        mlflow.set_tags({"ilr.kind": "baseline", "git_sha": tracking.git_sha()})
    version = register(info.model_uri, {"kind": "off-the-shelf", "backbone": model.cfg.backbone,
                                        "run_id": run.info.run_id, "git_sha": tracking.git_sha()}, alias=None)
    promote(version, "first champion: off-the-shelf ImageNet backbone with GeM")
    log_fn(f"registered the off-the-shelf model as {model_name()} v{version} (champion)")
    return version
