"""MLflow wiring: a SQLite store under $ILR_HOME unless MLFLOW_TRACKING_URI points at a server."""
from __future__ import annotations

import logging
import os
import subprocess
from functools import lru_cache

from data.config import ilr_home

os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
logging.getLogger("mlflow").setLevel(logging.WARNING)
logging.getLogger("alembic").setLevel(logging.WARNING)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ilr_home() / 'mlflow.db'}"


def setup(experiment: str) -> str:
    """Point MLflow at our store and make sure `experiment` exists (created once, by the caller's process).

    Returns the experiment id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        exp_id = mlflow.create_experiment(experiment, artifact_location=(ilr_home() / "mlartifacts" / experiment)
                                          .as_uri() if "MLFLOW_TRACKING_URI" not in os.environ else None)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


@lru_cache(maxsize=1)
def git_sha() -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return out.stdout.strip() if out.returncode == 0 else "unknown"
