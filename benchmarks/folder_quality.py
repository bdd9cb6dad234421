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

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg", "ihc.png",
          "retina.jpg", "brick.png", "camera.png", "coins.png", "moon.png", "page.png", "grass.png", "gravel.png")


def rephotograph(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Another photo of the same object: a partial view (45-70% of it, always around its centre),
    perspective, rotation, an occluder, other light and JPEG."""
    h, w = img.shape[:2]
    cw, ch = int(w * rng.uniform(0.45, 0.7)), int(h * rng.uniform(0.45, 0.7))
    # the window always holds the central 30% of the photo: views of one object overlap, as real ones do
    x0 = int(rng.integers(max(0, int(0.65 * w) - cw), min(int(0.35 * w), w - cw) + 1))
    y0 = int(rng.integers(max(0, int(0.65 * h) - ch), min(int(0.35 * h), h - ch) + 1))
    src = np.float32([[x0, y0], [x0 + cw, y0], [x0 + cw, y0 + ch], [x0, y0 + ch]])
    a = np.deg2rad(rng.uniform(-15, 15))
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    dst = (np.float32([[0, 0], [cw, 0], [cw, ch], [0, ch]]) - [cw / 2, ch / 2]) @ rot.T + [cw / 2, ch / 2]
    dst = (dst + rng.uniform(-0.12, 0.12, size=(4, 2)) * [cw, ch]).astype(np.float32)
    out = cv2.warpPerspective(img, cv2.getPerspectiveTransform(src, dst), (cw, ch), borderMode=cv2.BORDER_REFLECT)
    ox, oy = int(rng.integers(0, cw)), int(rng.integers(0, ch))
    cv2.rectangle(out, (ox, oy), (ox + cw // 5, oy + ch // 3), tuple(int(v) for v in rng.integers(0, 255, 3)), -1)
    out = np.clip(out.astype(np.float32) * rng.uniform(0.6, 1.4) + rng.normal(0, 4, out.shape), 0, 255)
    return out.astype(np.uint8)


def build(root: Path) -> None:
    import skimage
    from PIL import Image

    data = Path(skimage.__file__).parent / "data"
    rng = np.random.default_rng(0)
    for name in PHOTOS:
        img = np.asarray(Image.open(data / name).convert("RGB"))
        d = root / Path(name).stem
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / "0.jpg", quality=92)
        for k in range(1, 4):
            Image.fromarray(rephotograph(img, rng)).save(d / f"{k}.jpg", quality=int(rng.integers(80, 95)))
    d = root / "motorcycle"
    d.mkdir(exist_ok=True)
    for side in ("left", "right"):
        Image.open(data / f"motorcycle_{side}.png").convert("RGB").save(d / f"{side}.jpg", quality=92)
    from sklearn.datasets import load_sample_image

    for name in ("china.jpg", "flower.jpg"):  # single views: distractors for the others
        d = root / Path(name).stem
        d.mkdir(exist_ok=True)
        Image.fromarray(load_sample_image(name)).save(d / "0.jpg", quality=92)


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
