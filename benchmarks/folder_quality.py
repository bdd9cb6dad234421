"""A new user's path on a folder of real photos: `ilr data ingest --format folder`, then `ilr evaluate`
with and without re-ranking (leave-one-out protocol).

The photos are the real ones that ship in scikit-image and scikit-learn (no downloads here). Most have
one view, so each gets three more "re-photographs" (partial views of 45-70% of it under perspective,
rotation, an occluder, other light and JPEG); the motorcycle stereo pair is a genuine second view.

Run: .venv/bin/python benchmarks/folder_quality.py [--model MODEL_URI] [--features 500 1000]
Each --features value is a run with that many local features per image (`extract.max_local_features`;
500 is the CPU default, 1000 DELG's). It works in a throw-away git repository and ILR_HOME, leaving this
checkout alone.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--features", type=int, nargs="+", default=[500, 1000])
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ilr-folder-"))
    repo = tmp / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    env = {**os.environ, "ILR_HOME": str(tmp / "home"), "ILR_REPO": str(repo)}
    env.pop("MLFLOW_TRACKING_URI", None)
    from data.photos import build

    build(tmp / "photos")
    ilr = [sys.executable, "-m", "flows.cli"]
    cwd = Path(__file__).resolve().parents[1]
    subprocess.run(ilr + ["data", "ingest", "--format", "folder", str(tmp / "photos"), "--name", "real-photos"],
                   env=env, check=True, cwd=cwd)
    model = ["--model", args.model] if args.model else []
    import yaml

    from data.config import repo_root

    base = yaml.safe_load(Path(os.environ.get("ILR_PARAMS") or repo_root() / "params.yaml").read_text()) or {}
    for n in args.features:
        overrides = tmp / f"params-{n}.yaml"
        overrides.write_text(yaml.safe_dump({**base, "extract": {**base.get("extract", {}), "max_local_features": n}}))
        for flag in ("--no-rerank", "--rerank"):
            out = subprocess.run(ilr + ["evaluate", "--dataset", "real-photos", flag, *model],
                                 env={**env, "ILR_PARAMS": str(overrides)}, check=True, capture_output=True,
                                 text=True, cwd=cwd).stdout
            print(f"{n} local features {flag}:",
                  [line for line in out.splitlines() if line.startswith(("mAP", "global_map ", "rerank_map "))])


if __name__ == "__main__":
    main()
