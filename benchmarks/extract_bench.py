"""Extraction throughput: batched vs a per-image loop, and unified global+local vs two separate passes.

Run: .venv/bin/python benchmarks/extract_bench.py [--images 48] [--repeats 3]
The reference way is a per-image loop over the model as trained (no folding, NCHW, default threads).
Targets (CPU, 2 cores): batched >= 2x the images/s of a per-image loop over the same images (descriptors
equal within 1e-4); one pass for global+local >= 1.5x faster than two separate forward passes.
Variants are interleaved in each repeat (noisy machines); figures are medians.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import small_dataset  # noqa: E402
from models.artifacts import off_the_shelf  # noqa: E402
from models.config import ExtractConfig, ModelConfig  # noqa: E402
from models.delg import DELG  # noqa: E402
from models.extract import Extractor  # noqa: E402


class TwoPass(DELG):
    """The same network used as two models, one for global and one for local features (as separately
    exported DELF/DELG local and global models are run): the backbone runs twice."""

    def features(self, images):
        local_map, _ = self.backbone(images)
        _, global_map = self.backbone(images)
        return local_map, global_map


ILR = "per-image loop (ilr engine: folded, ONNX Runtime backbone: the CPU default)"
TORCH = "per-image loop (ilr engine: folded, torch backbone, channels_last)"


def timed(fn, n_images: int) -> float:
    t0 = time.perf_counter()
    fn()
    return n_images / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-side", type=int, default=384)
    ap.add_argument("--threads", type=int, default=0, help="threads of the ilr engines (0 = tuned); the "
                                                           "service extracts on 1 thread, two at once")
    args = ap.parse_args()
    folder, df = small_dataset("small")
    paths = [folder / p for p in df[df["split"] == "index"]["path"][: args.images]]
    model = off_the_shelf(ModelConfig())
    default_threads = torch.get_num_threads()
    # the reference way: one image at a time, default threads, NCHW tensors, the model as trained
    ref = Extractor(copy.deepcopy(model), ExtractConfig(max_side_px=args.max_side, batch_size=1, cpu_threads=default_threads,
                                         channels_last=False, optimize=False))
    batched = Extractor(copy.deepcopy(model), ExtractConfig(max_side_px=args.max_side, batch_size=8, cpu_batch_size=8,
                                                            cpu_threads=args.threads))
    tuned_threads = torch.get_num_threads()
    two = TwoPass(ModelConfig(), off_the_shelf=True)
    two.load_state_dict(model.state_dict())
    # per image on the torch backbone, as TORCH below: ONNX Runtime would merge the two identical backbone
    # passes of an exported graph (common-subexpression elimination), and the ONNX path runs `backbone` once
    two_pass = Extractor(two, ExtractConfig(max_side_px=args.max_side, batch_size=1, cpu_runtime="torch",
                                                 cpu_threads=args.threads))
    batched.extract(paths[:8]), ref.extract_one(paths[0])  # warm-up
    rows = {"per-image loop (reference way)": [], ILR: [], TORCH: [],
            "batched (ilr)": [], "two separate passes (per image, torch backbone)": []}
    single_tuned = Extractor(copy.deepcopy(model), ExtractConfig(max_side_px=args.max_side, batch_size=1,
                                                                 cpu_threads=args.threads))
    single_torch = Extractor(copy.deepcopy(model), ExtractConfig(max_side_px=args.max_side, batch_size=1,
                                                                 cpu_threads=args.threads,
                                                                 cpu_runtime="torch"))
    diff_g = diff_l = diff_ref = 0.0
    same_kp = 1.0
    for _ in range(args.repeats):
        torch.set_num_threads(default_threads)
        out_ref = []
        rows["per-image loop (reference way)"].append(timed(lambda: out_ref.extend(ref.extract_one(p) for p in paths),
                                                            len(paths)))
        torch.set_num_threads(tuned_threads)
        out_single = []
        rows[ILR].append(
            timed(lambda: out_single.extend(single_tuned.extract_one(p) for p in paths), len(paths)))
        rows[TORCH].append(timed(lambda: [single_torch.extract_one(p) for p in paths], len(paths)))
        out_b = []
        rows["batched (ilr)"].append(timed(lambda: out_b.extend(batched.extract(paths)), len(paths)))
        rows["two separate passes (per image, torch backbone)"].append(timed(lambda: two_pass.extract(paths), len(paths)))
        # batched vs per-image on the same engine: identical features expected (keypoints in the same order)
        diff_g = max(diff_g, max(float(np.abs(a.global_desc - b.global_desc).max()) for a, b in zip(out_single, out_b)))
        diff_l = max(diff_l, max(float(np.abs(a.descriptors - b.descriptors).max()) for a, b in zip(out_single, out_b)))
        # the folded engine vs the model as trained: float rounding only (near-equal keypoint scores may swap
        # places in the ranking, so local features are compared as sets of keypoints)
        diff_ref = max(diff_ref, max(float(np.abs(a.global_desc - b.global_desc).max()) for a, b in zip(out_ref, out_b)))
        same_kp = min(same_kp, min(len({tuple(k) for k in a.keypoints.round(1)} & {tuple(k) for k in b.keypoints.round(1)})
                                   / max(1, len(a.keypoints)) for a, b in zip(out_ref, out_b)))
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"{len(paths)} images, max side {args.max_side}px, scales {batched.cfg.scales}, "
          f"{batched.max_local} local features; torch threads default {default_threads}, tuned {tuned_threads}")
    for k, v in med.items():
        print(f"  {k:72s} {v:6.2f} img/s  (runs: {', '.join(f'{x:.2f}' for x in rows[k])})")
    print(f"batched / per-image loop (reference way): {med['batched (ilr)'] / med['per-image loop (reference way)']:.2f}x")
    print(f"batched / per-image loop (same engine settings): "
          f"{med['batched (ilr)'] / med[ILR]:.2f}x")
    print(f"ilr engine per image / reference per-image loop: "
          f"{med[ILR] / med['per-image loop (reference way)']:.2f}x")
    print(f"ONNX Runtime backbone / torch backbone, per image: {med[ILR] / med[TORCH]:.2f}x")
    print(f"unified / two separate passes (per image, torch backbone both): "
          f"{med[TORCH] / med['two separate passes (per image, torch backbone)']:.2f}x")
    print(f"max |difference| batched vs per-image (same engine): global {diff_g:.2e}, local {diff_l:.2e}")
    print(f"folded engine vs the model as trained: global max |difference| {diff_ref:.2e}, "
          f"at least {100 * same_kp:.1f}% of keypoints in common")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")


if __name__ == "__main__":
    main()
