"""Retrieval quality on real photos: global search, then each re-ranking score, from one set of features.

Folders of real photos (`root/<instance>/<image>`, leave-one-out: every photo with another photo of its
instance queries all the others) are extracted once per (model, extraction setting); the inliers of each
query's global top-K are computed once; every scoring variant then only re-orders them, so the table
compares scores on exactly the same features and matches. Standard (non-interpolated) AP, as
`ilr evaluate` reports for folders.

Suites:
  realdev       a folder of real multi-view photos given with --realdev (default: ILR_REALDEV)
  pkg-photos    the real photos that ship in scikit-image / scikit-learn, with re-photographed views
                (data/photos.py, the demo's `real-photos` golden suite; the motorcycle pair is a genuine
                second view)
  synthetic-small  the embedded dataset's 80 queries against its 110 index images (labels protocol)

Run:  .venv/bin/python benchmarks/real_quality.py --realdev PATH [--model off-the-shelf|URI|FOLDER ...]
      [--max-side 384 512] [--features 500 1000] [--backbone tf_efficientnet_lite0 tf_efficientnet_lite2]
      [--verifier delg rootsift [--sift-side 640] [--sift-threshold 8]]
Prints one row per (suite, model, setting, score): mAP (realdev also with its one known overlap scored as
junk, REALDEV_ALSO_SHOWS), extraction ms per image and geometric verification ms per query.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMAGE_EXT = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
# every variant re-orders the same candidates with the same inliers; "sg" = superglobal refinement
SCORES = {"inliers_first": {"score": "inliers_first", "refine": "none"},
          "fused": {"score": "fused", "inlier_floor": 0, "refine": "none"},
          "fused floor8": {"score": "fused", "inlier_floor": 8, "refine": "none"},
          "sg only": {"score": "fused", "inlier_weight": 0.0, "refine": "superglobal"},
          "aqe only": {"score": "fused", "inlier_weight": 0.0, "refine": "aqe"},
          "sg+fused": {"score": "fused", "inlier_floor": 0, "refine": "superglobal"},
          "aqe+fused8": {"score": "fused", "inlier_floor": 8, "refine": "aqe"},
          "sg+fused8 (default)": {"score": "fused", "inlier_floor": 8, "refine": "superglobal"}}

# Photos in realdev that also show another instance: two photos of the fountain (strecha_fountain 0008,
# 0010) have the castle's facade behind it (the fountain stands in the Ettlingen castle courtyard), so
# their verified correspondences with castle photos are true. Scored as junk for that pair of instances
# (neither positive nor negative: the Revisited Oxford/Paris treatment) in the "junk" rows.
REALDEV_ALSO_SHOWS = {"strecha_fountain/SfM_quality_evaluation__0008.jpg": "ettlingen_castle",
                      "strecha_fountain/SfM_quality_evaluation__0010.jpg": "ettlingen_castle"}


def folder_suite(root: Path) -> tuple[list[Path], np.ndarray]:
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXT)
    return paths, np.array([p.parent.name for p in paths])


def pkg_photos() -> Path:
    from data.photos import build

    from benchmarks.common import CACHE

    out = CACHE / "pkg-photos"
    if not out.exists():
        build(out)
    return out


def synthetic_suite(size: str = "small"):
    """The embedded dataset's queries against its index (labels protocol; distractors are never positive)."""
    from benchmarks.common import small_dataset, split

    folder, df = small_dataset(size)
    index, queries, _ = split(df)
    return ([folder / p for p in index["path"]], index["label"].to_numpy(),
            [folder / p for p in queries["path"]], queries["label"].to_numpy())


def junk_of(paths: list[Path], labels: np.ndarray, also_shows: dict[str, str]) -> list[np.ndarray]:
    """Leave-one-out junk per image: an image that also shows instance X is junk for X's queries, and X's
    images are junk for it."""
    rel = ["/".join(Path(p).parts[-2:]) for p in paths]
    extra = np.array([also_shows.get(r) for r in rel], dtype=object)
    out = []
    for i, lab in enumerate(labels):
        jk = np.flatnonzero(extra == lab)
        if extra[i] is not None:
            jk = np.union1d(jk, np.flatnonzero(labels == extra[i]))
        out.append(jk[jk != i])
    return out


def rootsift(paths, max_side: int, count: int) -> list[tuple]:
    """OpenCV SIFT keypoints (at most `count`, on the grey image with its longest side capped at max_side)
    with RootSIFT descriptors (Arandjelovic & Zisserman, CVPR 2012: L1-normalised, square root, so unit L2),
    as (keypoints in original pixels, descriptors, (width, height)): the verifier's input format."""
    import cv2
    from PIL import Image, ImageOps

    sift, out = cv2.SIFT_create(nfeatures=count), []
    for path in paths:
        with Image.open(path) as im:
            grey = ImageOps.exif_transpose(im).convert("L")
        size, scale = grey.size, min(1.0, max_side / max(grey.size))
        if scale < 1:
            grey = grey.resize((round(grey.width * scale), round(grey.height * scale)), Image.BILINEAR)
        kp, desc = sift.detectAndCompute(np.asarray(grey), None)
        if desc is None:
            out.append((np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32), size))
            continue
        desc = np.sqrt(desc / np.maximum(desc.sum(axis=1, keepdims=True), 1e-7)).astype(np.float32)
        out.append((np.array([k.pt for k in kp], np.float32) / scale, desc, size))
    return out


def evaluate_suite(paths, labels, model, ecfg, rcfg, scores: dict, q_paths=None, q_labels=None,
                   also_shows: dict | None = None, local_fn=None) -> dict:
    """{"global": mAP, "<score>": mAP, ..., "extract_ms": per image, "rerank_ms": per query}. Leave-one-out
    over `paths` unless queries are given; with `also_shows` (leave-one-out only) also the same with that
    junk, under "<name> junk". local_fn(paths) -> [(keypoints, descriptors, size)] replaces the model's
    local features for verification (e.g. rootsift); its time is added to extract_ms."""
    from data.config import NO_LABEL
    from models import metrics
    from models.extract import Extractor
    from models.features import pack_local, unpack_local
    from models.rerank import Reranker, ranking_score, refined_similarity

    extractor = Extractor(model, ecfg)
    t0 = time.perf_counter()
    feats = extractor.extract(paths)
    extract_ms = (time.perf_counter() - t0) * 1000 / len(paths)
    g = np.stack([f.global_desc for f in feats])
    local = [(*unpack_local(*pack_local(f)), f.size) for f in feats]  # int8 as stored
    if local_fn is not None:
        t0 = time.perf_counter()
        local = local_fn(paths)
        extract_ms += (time.perf_counter() - t0) * 1000 / len(paths)
    if q_paths is None:
        counts = {lab: int((labels == lab).sum()) for lab in set(labels)}
        queries = [i for i in range(len(paths)) if counts[labels[i]] >= 2]
        q_g, q_local, q_labels = g[queries], [local[i] for i in queries], labels[queries]
        sims = q_g @ g.T
        sims[np.arange(len(queries)), queries] = -np.inf
        gt = [np.flatnonzero((labels == labels[q]) & (np.arange(len(labels)) != q)) for q in queries]
        junk = [junk_of(paths, labels, also_shows)[q] for q in queries] if also_shows else None
    else:
        q_feats = extractor.extract(q_paths)
        q_g = np.stack([f.global_desc for f in q_feats])
        q_local = local_fn(q_paths) if local_fn else [(*unpack_local(*pack_local(f)), f.size) for f in q_feats]
        queries = list(range(len(q_paths)))
        sims = q_g @ g.T
        gt = [np.flatnonzero((labels == lab) & (labels != NO_LABEL)) for lab in q_labels]
        junk = None
    orders = np.argsort(-sims, axis=1, kind="stable")
    out = {"global": metrics.retrieval_map(orders, gt)["map"], "extract_ms": extract_ms}
    if junk is not None:
        out["global junk"] = metrics.retrieval_map(orders, gt, junk)["map"]
    k = min(rcfg.top_k, len(paths) - (1 if q_paths is None else 0))
    reranker = Reranker(rcfg)
    inliers = np.zeros((len(queries), k), np.int64)
    t0 = time.perf_counter()
    for qi in range(len(queries)):
        top = orders[qi, :k]
        inliers[qi] = reranker.inliers(q_local[qi][0], q_local[qi][1], [local[j] for j in top])
    out["rerank_ms"] = (time.perf_counter() - t0) * 1000 / len(queries)
    for name, over in scores.items():
        cfg = replace(rcfg, **over)
        new = orders.copy()
        for qi in range(len(queries)):
            top = orders[qi, :k]
            sim = refined_similarity(q_g[qi], g[top], sims[qi, top], cfg)
            s = ranking_score(inliers[qi], sims[qi, top], cfg, sim)
            new[qi, :k] = top[np.argsort(-s, kind="stable")]
        out[name] = metrics.retrieval_map(new, gt)["map"]
        if junk is not None:
            out[f"{name} junk"] = metrics.retrieval_map(new, gt, junk)["map"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--realdev", default=os.environ.get("ILR_REALDEV"), help="folder of real photos per instance")
    ap.add_argument("--suites", nargs="+", default=["realdev", "pkg-photos"])
    ap.add_argument("--model", nargs="+", default=["off-the-shelf"])
    ap.add_argument("--backbone", nargs="+", default=[None], help="off-the-shelf backbone(s)")
    ap.add_argument("--gem-p", type=float, nargs="+", default=[None], help="off-the-shelf GeM power(s)")
    ap.add_argument("--scales", nargs="+", default=[None], help="extraction scales, comma-separated (e.g. 1.0 "
                    "or 0.7071,1.0,1.4142)")
    ap.add_argument("--max-side", type=int, nargs="+", default=[None])
    ap.add_argument("--features", type=int, nargs="+", default=[None])
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--ratio", type=float, nargs="+", default=[None], help="matcher ratio test (1.0 = off)")
    ap.add_argument("--verifier", nargs="+", default=["delg"], choices=["delg", "rootsift"],
                    help="local features for verification: the model's, or OpenCV RootSIFT")
    ap.add_argument("--sift-side", type=int, default=640, help="rootsift: longest side of the image it reads")
    ap.add_argument("--sift-threshold", type=float, default=8.0, help="rootsift: RANSAC threshold in pixels at "
                    "--sift-side")
    args = ap.parse_args()

    from models import artifacts, registry
    from models.config import extract_config, model_config, rerank_config

    suites = {}
    for s in args.suites:
        if s == "realdev":
            if not args.realdev:
                sys.exit("realdev: pass --realdev PATH (or set ILR_REALDEV)")
            suites[s] = folder_suite(Path(args.realdev))
        elif s == "pkg-photos":
            suites[s] = folder_suite(pkg_photos())
        elif s == "synthetic-small":
            suites[s] = synthetic_suite()
        else:
            suites[s] = folder_suite(Path(s))
    print(f"{'suite':15s} {'model':24s} {'side':>4s} {'feat':>4s} {'ratio':>5s} {'verifier':8s} {'score':20s} "
          f"{'mAP':>7s} {'junk':>7s} {'ext ms':>7s} {'rr ms':>6s}")
    for model_ref in args.model:
        for backbone, gem_p in [(b, p) for b in args.backbone for p in args.gem_p]:
            if model_ref == "off-the-shelf":
                model = artifacts.off_the_shelf(model_config(**{k: v for k, v in {"backbone": backbone,
                                                                                  "gem_p": gem_p}.items() if v}))
                name = f"ots {model.cfg.backbone.replace('tf_efficientnet_', '')} p{model.cfg.gem_p:g}"
            else:
                model, name = registry.resolve(model_ref)
                name = name[-24:]
            for side, n, scales in [(a, b, c) for a in args.max_side for b in args.features for c in args.scales]:
                ecfg = extract_config(**{k: v for k, v in {"max_side_px": side, "max_local_features": n}.items() if v},
                                      **({"scales": tuple(float(x) for x in scales.split(","))} if scales else {}))
                name_s = name + (f" s{scales}" if scales else "")
                for suite, (paths, labels, *queries) in suites.items():
                    for ratio, verifier in [(r, v) for r in args.ratio for v in args.verifier]:
                        rcfg = rerank_config(**{k: v for k, v in {"top_k": args.top_k, "ratio": ratio}.items() if v})
                        local_fn = None
                        if verifier == "rootsift":  # SIFT's keypoints are precise to a pixel, not a 16-px cell
                            rcfg = replace(rcfg, ransac_threshold_px=args.sift_threshold,
                                           threshold_reference_px=args.sift_side)
                            local_fn = lambda p: rootsift(p, args.sift_side, ecfg.local_count("cpu"))  # noqa: E731
                        r = evaluate_suite(paths, labels, model, ecfg, rcfg, SCORES, *queries,
                                           also_shows=REALDEV_ALSO_SHOWS if suite == "realdev" else None,
                                           local_fn=local_fn)
                        for score in ["global", *SCORES]:
                            junk = f"{r[score + ' junk']:7.4f}" if score + " junk" in r else f"{'':7s}"
                            print(f"{suite:15s} {name_s[:24]:24s} {ecfg.max_side_px:4d} {ecfg.local_count('cpu'):4d} "
                                  f"{rcfg.ratio:5.2f} {verifier:8s} {score:20s} {r[score]:7.4f} {junk} "
                                  f"{r['extract_ms']:7.0f} {r['rerank_ms']:6.0f}", flush=True)


if __name__ == "__main__":
    main()
