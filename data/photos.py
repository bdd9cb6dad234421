"""A real-photo suite from the photos that ship in installed packages (no downloads).

scikit-image's `skimage/data` and scikit-learn's sample images are real photographs. Most have one view,
so each gets three "re-photographs" (partial views of 45-70% of it under perspective, rotation, an
occluder, other light and JPEG); the motorcycle stereo pair is a genuine second view; china.jpg and
flower.jpg are single views (distractors). A folder dataset (`root/<label>/<image>`, leave-one-out): the
demo versions it as `real-photos` and the promotion gate uses it as a golden suite.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

SUITE_NAME = "real-photos"

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


def build(root: Path) -> Path:
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
    return root


def ensure_suite(log=print) -> str:
    """The built-in real-photo suite, versioned in this workspace: built from the packaged photos and
    ingested (validated, versioned) the first time it is needed. Returns its NAME@VERSION."""
    import tempfile

    from data.config import data_config
    from data.versioning import ingest, versions

    found = versions(SUITE_NAME)
    if found:
        return found[-1].ref
    with tempfile.TemporaryDirectory(prefix="ilr-photos-") as tmp:
        version, _ = ingest("folder", str(build(Path(tmp) / "photos")), SUITE_NAME, data_config(), log=log)
    log(f"golden suite {version.ref}: real photos from installed packages, versioned")
    return version.ref
