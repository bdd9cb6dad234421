"""The embedded default dataset: a seeded, multi-domain instance-level recognition dataset, no downloads.

Three domains, each with many instances that share a style, so that recognising the *instance* matters:
- landmark: procedurally drawn facades; a style (palette, window shape, roof, ornament) is shared by a group
  of buildings that differ in window grid, door, signs, ornaments and details;
- artwork: crops of the real photos shipped in scikit-image / scikit-learn, framed and hung in generated
  rooms (crops of one photo are different paintings of the same "artist");
- product: generated packaging; a brand (colours, logo, name) is shared by products that differ in
  variant text, accent, icon and pattern.

Each instance is seen in several views: homography (viewpoint), scale, rotation, crop and occlusion,
illumination, blur and noise, and a new background each time. Distractor images contain no instance.
Train/val classes are disjoint from the index/query instances (as GLDv2's train vs index/test).
The same seed gives byte-identical files.
"""
from __future__ import annotations

import io
import json
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from data import manifest
from data.config import NO_LABEL, check_size


@dataclass(frozen=True)
class SyntheticSpec:
    train_classes: int
    eval_instances: int
    train_views: int = 4      # per train class; one of them goes to val
    index_views: int = 2
    query_views: int = 1
    distractors: int = 4
    image_px: int = 256       # longest side of every view
    style_group: int = 4      # instances per shared style


SIZES = {
    "tiny": SyntheticSpec(train_classes=12, eval_instances=8, train_views=4, index_views=2, query_views=1,
                          distractors=4, image_px=256),
    "small": SyntheticSpec(train_classes=60, eval_instances=40, train_views=5, index_views=2, query_views=2,
                           distractors=30, image_px=384),
    "medium": SyntheticSpec(train_classes=600, eval_instances=400, train_views=5, index_views=2, query_views=2,
                            distractors=200, image_px=384),
}
DOMAIN_CYCLE = ("landmark", "artwork", "product")
_CANON = 256  # side of the canonical instance image
_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
           "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png", "page.png",
           "retina.jpg", "rocket.jpg", "clock_motion.png", "cell.png", "china.jpg", "flower.jpg")
_SYLL = ("ka", "lo", "mi", "ra", "ven", "to", "zu", "bel", "qui", "nor", "sa", "dex", "fi", "mo", "lux", "ta")


# ----------------------------------------------------------------------------------------------------------
# canonical instances: RGB image [S x S x 3] uint8 and mask [S x S] uint8 (255 = object)

def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def _color(rng, base=None, spread=40) -> tuple[int, int, int]:
    if base is None:
        return tuple(int(v) for v in rng.integers(30, 226, 3))
    return tuple(int(np.clip(b + rng.integers(-spread, spread + 1), 0, 255)) for b in base)


def _word(rng, n=(2, 3)) -> str:
    return "".join(rng.choice(_SYLL, size=int(rng.integers(n[0], n[1] + 1)))).upper()


def _facade(style: np.random.Generator, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    s = _CANON
    img = np.zeros((s, s, 3), np.uint8)
    mask = np.zeros((s, s), np.uint8)
    wall = _color(style)
    roof_kind = int(style.integers(0, 3))
    win_kind = int(style.integers(0, 3))
    trim = _color(style)
    wall = _color(rng, wall, 18)
    top = int(s * 0.22)
    cv2.rectangle(img, (16, top), (s - 17, s - 1), wall, -1)
    cv2.rectangle(mask, (16, top), (s - 17, s - 1), 255, -1)
    # brick/stone texture, unique per instance
    tex = rng.integers(-14, 15, size=(s // 8, s // 8, 1)).astype(np.int16)
    tex = cv2.resize(tex.astype(np.float32), (s, s), interpolation=cv2.INTER_NEAREST)[..., None]
    img = np.clip(img.astype(np.int16) + (tex * (mask[..., None] > 0)).astype(np.int16), 0, 255).astype(np.uint8)
    roof = _color(style)
    if roof_kind == 0:
        pts = np.array([[8, top], [s // 2, int(rng.integers(4, top - 8))], [s - 9, top]], np.int32)
        cv2.fillPoly(img, [pts], roof), cv2.fillPoly(mask, [pts], 255)
    elif roof_kind == 1:
        r = int(rng.integers(top // 2, top))
        cv2.ellipse(img, (s // 2, top), (r + 20, r), 0, 180, 360, roof, -1)
        cv2.ellipse(mask, (s // 2, top), (r + 20, r), 0, 180, 360, 255, -1)
    else:
        cv2.rectangle(img, (10, top - 12), (s - 11, top), roof, -1)
        cv2.rectangle(mask, (10, top - 12), (s - 11, top), 255, -1)
        for x in range(14, s - 14, int(rng.integers(14, 26))):
            cv2.rectangle(img, (x, top - 20), (x + 7, top - 12), roof, -1)
            cv2.rectangle(mask, (x, top - 20), (x + 7, top - 12), 255, -1)
    cols, rows = int(rng.integers(3, 7)), int(rng.integers(2, 6))
    x0, x1, y0, y1 = 30, s - 30, top + 14, s - 60
    cw, rh = (x1 - x0) / cols, (y1 - y0) / rows
    glass = _color(style)
    for r in range(rows):
        for c in range(cols):
            if rng.random() < 0.12:
                continue  # a bricked-up window: an instance detail
            wx, wy = int(x0 + c * cw + cw * 0.2), int(y0 + r * rh + rh * 0.15)
            ww, wh = int(cw * 0.6), int(rh * 0.65)
            col = _color(rng, glass, 25) if rng.random() < 0.8 else (235, 220, 120)
            if win_kind == 0:
                cv2.rectangle(img, (wx, wy), (wx + ww, wy + wh), col, -1)
            elif win_kind == 1:
                cv2.rectangle(img, (wx, wy + ww // 2), (wx + ww, wy + wh), col, -1)
                cv2.ellipse(img, (wx + ww // 2, wy + ww // 2), (ww // 2, ww // 2), 0, 180, 360, col, -1)
            else:
                cv2.circle(img, (wx + ww // 2, wy + wh // 2), max(3, min(ww, wh) // 2), col, -1)
            cv2.rectangle(img, (wx, wy), (wx + ww, wy + wh), trim, 1)
    dx = int(rng.integers(40, s - 80))
    cv2.rectangle(img, (dx, s - 52), (dx + 34, s - 1), _color(rng), -1)
    cv2.ellipse(img, (dx + 17, s - 52), (17, 12), 0, 180, 360, _color(rng), -1)
    if rng.random() < 0.8:  # a sign with the building's name
        sx = int(rng.integers(20, s - 130))
        cv2.rectangle(img, (sx, top + 2), (sx + 110, top + 14), _color(rng), -1)
        cv2.putText(img, _word(rng), (sx + 3, top + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (250, 250, 250), 1,
                    cv2.LINE_AA)
    for _ in range(int(rng.integers(1, 4))):  # ornaments: clock, rose window, columns
        kind = int(rng.integers(0, 3))
        cx, cy = int(rng.integers(40, s - 40)), int(rng.integers(top + 20, s - 70))
        if kind == 0:
            cv2.circle(img, (cx, cy), 13, (240, 240, 230), -1)
            cv2.circle(img, (cx, cy), 13, (20, 20, 20), 2)
            a = rng.uniform(0, 2 * math.pi)
            cv2.line(img, (cx, cy), (int(cx + 10 * math.cos(a)), int(cy + 10 * math.sin(a))), (20, 20, 20), 2)
        elif kind == 1:
            cv2.circle(img, (cx, cy), 11, _color(rng), -1)
            for k in range(8):
                a = k * math.pi / 4
                cv2.line(img, (cx, cy), (int(cx + 11 * math.cos(a)), int(cy + 11 * math.sin(a))), trim, 1)
        else:
            for k in range(int(rng.integers(2, 5))):
                cv2.rectangle(img, (cx + 12 * k, top), (cx + 12 * k + 5, s - 1), trim, -1)
    return img, mask


@lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    if name in ("china.jpg", "flower.jpg"):
        from sklearn.datasets import load_sample_image
        arr = load_sample_image(name)
    else:
        import skimage
        arr = np.asarray(Image.open(Path(skimage.__file__).parent / "data" / name).convert("RGB"))
    return np.ascontiguousarray(arr[..., :3])


def _painting(style: np.random.Generator, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    s = _CANON
    photo = _photo(_PHOTOS[int(style.integers(0, len(_PHOTOS)))])
    h, w = photo.shape[:2]
    side = int(min(h, w) * rng.uniform(0.35, 0.7))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = photo[y:y + side, x:x + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    frame = int(style.integers(8, 20))
    inner = cv2.resize(np.ascontiguousarray(crop), (s - 2 * frame, s - 2 * frame), interpolation=cv2.INTER_AREA)
    tone = rng.uniform(0.8, 1.15, size=3)
    inner = np.clip(inner.astype(np.float32) * tone, 0, 255).astype(np.uint8)
    img = np.full((s, s, 3), _color(style), np.uint8)
    cv2.rectangle(img, (2, 2), (s - 3, s - 3), _color(style), 3)
    img[frame:s - frame, frame:s - frame] = inner
    return img, np.full((s, s), 255, np.uint8)


def _package(style: np.random.Generator, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    s = _CANON
    bw = int(s * 0.72)
    x0 = (s - bw) // 2
    base, ink, accent = _color(style), _color(style), _color(rng)
    img = np.zeros((s, s, 3), np.uint8)
    mask = np.zeros((s, s), np.uint8)
    cv2.rectangle(img, (x0, 0), (x0 + bw, s - 1), base, -1)
    cv2.rectangle(mask, (x0, 0), (x0 + bw, s - 1), 255, -1)
    pattern = int(rng.integers(0, 3))
    for k in range(int(rng.integers(6, 14))):
        px, py = int(rng.integers(x0, x0 + bw)), int(rng.integers(140, s))
        if pattern == 0:
            cv2.circle(img, (px, py), int(rng.integers(2, 7)), accent, -1)
        elif pattern == 1:
            cv2.line(img, (x0, py), (x0 + bw, py + int(rng.integers(-20, 20))), accent, 2)
        else:
            cv2.rectangle(img, (px, py), (px + 6, py + 6), accent, -1)
    # brand logo: a fixed composition of shapes per brand
    for _ in range(3):
        kind, cx, cy = int(style.integers(0, 3)), int(x0 + style.integers(20, bw - 20)), int(style.integers(15, 60))
        col = _color(style)
        if kind == 0:
            cv2.circle(img, (cx, cy), int(style.integers(8, 18)), col, -1)
        elif kind == 1:
            pts = np.array([[cx, cy - 14], [cx - 14, cy + 12], [cx + 14, cy + 12]], np.int32)
            cv2.fillPoly(img, [pts], col)
        else:
            cv2.rectangle(img, (cx - 12, cy - 9), (cx + 12, cy + 9), col, -1)
    brand = _word(style)
    cv2.putText(img, brand, (x0 + 8, 92), cv2.FONT_HERSHEY_DUPLEX, 0.8, ink, 2, cv2.LINE_AA)
    variant = f"{_word(rng, (1, 2))} {int(rng.integers(1, 20)) * 50}g"
    cv2.rectangle(img, (x0 + 6, 102), (x0 + bw - 6, 126), accent, -1)
    cv2.putText(img, variant, (x0 + 10, 120), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1, cv2.LINE_AA)
    icon = int(rng.integers(0, 3))
    ic = (x0 + int(rng.integers(30, bw - 30)), int(rng.integers(150, 200)))
    if icon == 0:
        cv2.drawMarker(img, ic, ink, cv2.MARKER_STAR, 30, 3)
    elif icon == 1:
        cv2.drawMarker(img, ic, ink, cv2.MARKER_DIAMOND, 28, 3)
    else:
        cv2.circle(img, ic, 14, ink, 3)
    for k in range(24):  # barcode, unique per product
        if rng.random() < 0.55:
            bx = x0 + bw - 70 + 2 * k
            cv2.line(img, (bx, s - 36), (bx, s - 12), (15, 15, 15), 1)
    return img, mask


_RENDER = {"landmark": _facade, "artwork": _painting, "product": _package}


def render_instance(seed: int, domain: str, index: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """The canonical image and mask of instance `index`; instances with the same `group` share a style."""
    style = _rng(seed, 1, DOMAIN_CYCLE.index(domain), group)
    rng = _rng(seed, 2, DOMAIN_CYCLE.index(domain), index)
    return _RENDER[domain](style, rng)


# ----------------------------------------------------------------------------------------------------------
# scenes and views

def _background(rng, domain: str, w: int, h: int, seed: int) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    if domain == "landmark":  # sky gradient over ground, with generic buildings around
        sky0, sky1 = np.array(_color(rng)), np.array(_color(rng))
        t = np.linspace(0, 1, h)[:, None, None]
        img[:] = (sky0 * (1 - t) + sky1 * t).astype(np.uint8)
        horizon = int(h * rng.uniform(0.6, 0.85))
        img[horizon:] = _color(rng)
        for _ in range(int(rng.integers(1, 4))):
            bx, bw_ = int(rng.integers(-40, w)), int(rng.integers(40, 120))
            cv2.rectangle(img, (bx, int(rng.integers(h // 4, horizon))), (bx + bw_, horizon), _color(rng), -1)
    elif domain == "artwork":  # a room: wall, floor, other frames
        img[:] = _color(rng)
        floor = int(h * rng.uniform(0.75, 0.9))
        img[floor:] = _color(rng)
        for _ in range(int(rng.integers(0, 3))):
            fx, fy = int(rng.integers(0, w - 40)), int(rng.integers(0, floor - 40))
            cv2.rectangle(img, (fx, fy), (fx + int(rng.integers(30, 80)), fy + int(rng.integers(30, 80))),
                          _color(rng), -1)
    else:  # a shelf or table with other packages
        img[:] = _color(rng)
        for y in range(int(rng.integers(40, 90)), h, int(rng.integers(70, 120))):
            cv2.rectangle(img, (0, y), (w, y + 6), _color(rng), -1)
        for _ in range(int(rng.integers(1, 5))):
            px, py = int(rng.integers(-20, w)), int(rng.integers(0, h - 30))
            cv2.rectangle(img, (px, py), (px + int(rng.integers(30, 70)), py + int(rng.integers(40, 90))),
                          _color(rng), -1)
    noise = rng.normal(0, 4, size=(h // 4 + 1, w // 4 + 1, 3)).astype(np.float32)
    noise = cv2.resize(noise, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def _view(obj: np.ndarray, mask: np.ndarray, rng, domain: str, w: int, h: int, strength: float, seed: int):
    """Place the object in a new scene under a random homography and photometric change. [H x W x 3] uint8."""
    scene = _background(rng, domain, w, h, seed)
    s = obj.shape[0]
    scale = rng.uniform(0.55, 0.9) * min(w, h) / s
    angle = rng.uniform(-12, 12) * strength
    cx = w / 2 + rng.uniform(-0.18, 0.18) * w * strength
    cy = h / 2 + rng.uniform(-0.15, 0.15) * h * strength
    corners = np.array([[0, 0], [s, 0], [s, s], [0, s]], np.float32) - s / 2
    jitter = rng.uniform(-0.14, 0.14, size=(4, 2)).astype(np.float32) * s * strength  # viewpoint
    a = math.radians(angle)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], np.float32)
    dst = ((corners + jitter) @ rot.T) * scale + np.array([cx, cy], np.float32)
    H = cv2.getPerspectiveTransform(corners + s / 2, dst.astype(np.float32))
    warped = cv2.warpPerspective(obj, H, (w, h), flags=cv2.INTER_LINEAR)
    wmask = cv2.warpPerspective(mask, H, (w, h), flags=cv2.INTER_LINEAR).astype(np.float32)[..., None] / 255
    out = scene.astype(np.float32) * (1 - wmask) + warped.astype(np.float32) * wmask
    for _ in range(int(rng.integers(0, 3 if strength > 0.5 else 2))):  # occluders: poles, people, trees
        ox, oy = int(rng.integers(0, w)), int(rng.integers(0, h))
        col = _color(rng)
        if rng.random() < 0.5:
            cv2.rectangle(out, (ox, oy), (ox + int(rng.integers(8, 30)), h), col, -1)
        else:
            cv2.ellipse(out, (ox, oy), (int(rng.integers(10, 35)), int(rng.integers(20, 60))), 0, 0, 360, col, -1)
    gain = rng.uniform(1 - 0.35 * strength, 1 + 0.3 * strength)
    cast = rng.uniform(1 - 0.12 * strength, 1 + 0.12 * strength, size=3)
    gamma = rng.uniform(1 - 0.3 * strength, 1 + 0.3 * strength)
    out = 255 * (np.clip(out * gain * cast, 0, 255) / 255) ** gamma
    sigma = rng.uniform(0, 1.4 * strength)
    if sigma > 0.3:
        out = cv2.GaussianBlur(out, (0, 0), sigma)
    out = out + rng.normal(0, rng.uniform(0, 6 * strength), size=out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def _jpeg(arr: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()


def _plan(spec: SyntheticSpec, seed: int) -> list[dict]:
    """One record per instance (or distractor): what to render and which views go to which split."""
    jobs = []
    n = spec.train_classes + spec.eval_instances
    order = _rng(seed, 3).permutation(n)  # which instances are train classes vs eval instances
    train_set = set(order[:spec.train_classes].tolist())
    for i in range(n):
        domain = DOMAIN_CYCLE[i % 3]
        if i in train_set:
            splits = ["train"] * (spec.train_views - 1) + ["val"]
        else:
            splits = ["index"] * spec.index_views + ["query"] * spec.query_views
        jobs.append({"kind": "instance", "i": i, "domain": domain, "group": (i // 3) // spec.style_group,
                     "splits": splits})
    for d in range(spec.distractors):
        jobs.append({"kind": "distractor", "i": d, "domain": DOMAIN_CYCLE[d % 3], "splits": ["index"]})
    return jobs


def _render_job(args) -> list[tuple[dict, bytes]]:
    job, spec, seed = args
    w = spec.image_px
    h = int(round(w * 0.75))
    out = []
    if job["kind"] == "distractor":
        rng = _rng(seed, 5, job["i"])
        img = _background(rng, job["domain"], w, h, seed)
        if rng.random() < 0.7:  # a one-off object that belongs to no instance: a hard negative
            obj, mask = render_instance(seed + 7919, job["domain"], 100_000 + job["i"], 10_000 + job["i"])
            img = _view(obj, mask, rng, job["domain"], w, h, 0.8, seed)
        row = {"image_id": f"distractor-{job['i']:05d}", "label": NO_LABEL, "split": "index",
               "domain": job["domain"], "source": f"synthetic:distractor:{job['domain']}"}
        return [(row, _jpeg(img, 90))]
    obj, mask = render_instance(seed, job["domain"], job["i"], job["group"])
    label = f"{job['domain']}-{job['i']:05d}"
    for v, split in enumerate(job["splits"]):
        rng = _rng(seed, 4, job["i"], v)
        strength = {"index": 0.45, "query": 1.0}.get(split, 0.8)
        img = _view(obj, mask, rng, job["domain"], w, h, strength, seed)
        row = {"image_id": f"{label}-{split}{v}", "label": label, "split": split, "domain": job["domain"],
               "source": f"synthetic:{job['domain']}:group{job['group']}"}
        out.append((row, _jpeg(img, int(rng.integers(82, 96)))))
    return out


def generate(out_dir: Path, size: str | SyntheticSpec = "tiny", seed: int = 0, workers: int = 2,
             progress=None) -> pd.DataFrame:
    """Write `size` ("tiny", "small", "medium", or a custom spec) into out_dir/{images/, manifest.parquet,
    dataset.json}."""
    if isinstance(size, SyntheticSpec):
        spec, size = size, "custom"
    elif size in SIZES:
        spec = SIZES[size]
    else:
        check_size("synthetic", size)   # raises: an unknown size
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    jobs = [(job, spec, seed) for job in _plan(spec, seed)]
    rows = []
    if workers > 1:
        ctx = __import__("multiprocessing").get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            results = pool.map(_render_job, jobs, chunksize=4)
            for res in results:
                rows.extend(_save(res, out_dir))
                progress and progress(len(rows))
    else:
        for job in jobs:
            rows.extend(_save(_render_job(job), out_dir))
            progress and progress(len(rows))
    df = manifest.normalize(pd.DataFrame(rows), str(out_dir))
    manifest.write(df, out_dir, {"name": f"synthetic-{size}", "format": "synthetic", "protocol": "labels",
                                 "synthetic": {"size": size, "seed": seed, **asdict(spec)}})
    return df


def _save(results, out_dir: Path) -> list[dict]:
    rows = []
    for row, data in results:
        path = f"images/{row['image_id']}.jpg"
        (out_dir / path).write_bytes(data)
        rows.append({**row, "path": path})
    return rows


def is_generated(folder: Path) -> bool:
    info = Path(folder) / manifest.INFO
    return info.is_file() and json.loads(info.read_text()).get("format") == "synthetic"
