"""MLflow wiring: a SQLite store under $ILR_HOME unless MLFLOW_TRACKING_URI points at a server."""
from __future__ import annotations

import os
import subprocess
from functools import lru_cache

from data.config import default_tracking_uri, ilr_home, quiet_libraries



def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def setup(experiment: str) -> str:
    """Point MLflow at our store and make sure `experiment` exists (created once, by the caller's process).

    Returns the experiment id."""
    quiet_libraries()
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)  # note: this also exports MLFLOW_TRACKING_URI to child processes
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        # with our embedded SQLite store, artifacts live under $ILR_HOME too (a server decides for itself)
        local = uri == default_tracking_uri()
        exp_id = mlflow.create_experiment(
            experiment, artifact_location=(ilr_home() / "mlartifacts" / experiment).as_uri() if local else None)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


@lru_cache(maxsize=1)
def git_sha() -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return out.stdout.strip() if out.returncode == 0 else "unknown"
