"""Batched multi-scale DELG extraction: one backbone pass per scale yields global and local features.

- Each image is resized so its longest side is at most `max_side_px`, with both sides rounded to a
  multiple of `bucket_px`; images of the same size form a bucket and go through the network together.
  The per-image path applies the same preprocessing, so batched and single descriptors agree.
- Global: per scale GeM -> whitening -> L2, summed over scales {1/sqrt2, 1, sqrt2}, L2 again.
- Local: every position of the stage-4 map at every scale is a candidate keypoint (its receptive-field
  centre, mapped to original-image pixels); the `max_local_features` with the highest score
  (>= `attention_threshold`) are kept, descriptors L2-normalised. The score is the learned attention, the
  feature norm, or their product (`keypoint_score`): on the embedded `small` dataset a briefly fine-tuned
  model re-ranked at 0.63 mAP with the learned attention, 0.92 with the product and 0.94 with the norm
  (BENCHMARKS.md), so the norm is the default until the attention head is trained longer.
- Compact storage: keypoints as uint16 pixels, descriptors as int8 (x * 127; exact range since they are
  unit vectors): 1/4 of the float32 record.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from data.images import load_rgb
from models.config import ExtractConfig, resolve_device
from models.delg import DELG

QUANT = 127.0


@dataclass
class Features:
    """Features of one image. global_desc: [D]; keypoints: [N x 2] (x, y) original pixels; descriptors:
    [N x d] float32 L2-normalised; scores: [N] attention; scales: [N] pyramid scale of each keypoint."""
    global_desc: np.ndarray
    keypoints: np.ndarray
    descriptors: np.ndarray
    scores: np.ndarray
    scales: np.ndarray
    size: tuple[int, int]  # original (width, height)


def pack_local(f: Features) -> tuple[np.ndarray, np.ndarray]:
    """(keypoints uint16 [N x 2], descriptors int8 [N x d]) — 1/4 of float32 storage."""
    kp = np.clip(np.rint(f.keypoints), 0, 65535).astype(np.uint16)
    return kp, np.clip(np.rint(f.descriptors * QUANT), -127, 127).astype(np.int8)


def unpack_local(kp: np.ndarray, desc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = desc.astype(np.float32) / QUANT
    d /= np.linalg.norm(d, axis=1, keepdims=True).clip(min=1e-6)
    return kp.astype(np.float32), d


def bucket_size(width: int, height: int, max_side: int, bucket: int) -> tuple[int, int]:
    """Target (width, height): longest side <= max_side, both multiples of `bucket`, aspect kept roughly."""
    scale = min(1.0, max_side / max(width, height))
    return (max(bucket, int(round(width * scale / bucket)) * bucket),
            max(bucket, int(round(height * scale / bucket)) * bucket))


@lru_cache(maxsize=4)
def best_cpu_threads(max_threads: int) -> int:
    """On small shared CPUs one intra-op thread is often faster than several (spinning threads contend):
    time both once and keep the faster."""
    if max_threads <= 1:
        return 1
    conv = torch.nn.Sequential(*[torch.nn.Conv2d(32, 32, 3, padding=1) for _ in range(4)]).eval()
    x = torch.randn(2, 32, 64, 64)
    prev, timings = torch.get_num_threads(), {}
    with torch.inference_mode():
        for n in (1, max_threads):
            torch.set_num_threads(n)
            conv(x)
            t0 = time.perf_counter()
            for _ in range(3):
                conv(x)
            timings[n] = time.perf_counter() - t0
    torch.set_num_threads(prev)
    return min(timings, key=timings.get)


class Extractor:
    """Wraps a DELG model for inference on lists of images (RGB uint8 arrays or file paths)."""

    def __init__(self, model: DELG, cfg: ExtractConfig | None = None, device: str | None = None):
        self.cfg = cfg or ExtractConfig()
        self.device = resolve_device(device or self.cfg.device)
        self.model = model.eval().to(self.device)
        self.channels_last = self.device == "cpu" and self.cfg.channels_last
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.device == "cpu":
            threads = self.cfg.cpu_threads or best_cpu_threads(os.cpu_count() or 1)
            torch.set_num_threads(threads)
        self.max_local = self.cfg.local_count(self.device)
        mean = torch.tensor(model.cfg.mean).view(1, 3, 1, 1)
        std = torch.tensor(model.cfg.std).view(1, 3, 1, 1)
        self.mean, self.std = mean.to(self.device), std.to(self.device)
        self.global_scales = tuple(float(s) for s in self.cfg.scales)
        self.local_scales = tuple(sorted(set(self.global_scales) | {float(s) for s in self.cfg.local_scales}))
        self._pool = ThreadPoolExecutor(max_workers=2)

    # ---------------------------------------------------------------------------------------------- input
    def prepare(self, image: np.ndarray | str | Path) -> tuple[np.ndarray, tuple[int, int]]:
        """RGB uint8 [H x W x 3] at its bucket size, and the original (width, height)."""
        arr = load_rgb(image) if isinstance(image, (str, Path)) else image
        h, w = arr.shape[:2]
        tw, th = bucket_size(w, h, self.cfg.max_side_px, self.cfg.bucket_px)
        if (tw, th) != (w, h):
            arr = cv2.resize(arr, (tw, th), interpolation=cv2.INTER_AREA if tw < w else cv2.INTER_LINEAR)
        return np.ascontiguousarray(arr), (w, h)

    # ---------------------------------------------------------------------------------------------- core
    @torch.inference_mode()
    def _run(self, batch: np.ndarray, sizes: Sequence[tuple[int, int]]) -> list[Features]:
        """batch: [B x H x W x 3] uint8, all the same bucket size."""
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device).permute(0, 3, 1, 2).float().div_(255)
        x = (x - self.mean) / self.std
        B, _, H, W = x.shape
        g_sum = 0
        scores, descs, locs, scl = [], [], [], []
        stride = self.model.local_stride
        for s in self.local_scales:
            xs = x if s == 1.0 else F.interpolate(x, size=(max(stride, round(H * s)), max(stride, round(W * s))),
                                                  mode="bilinear", align_corners=False, antialias=s < 1)
            if self.channels_last:
                xs = xs.contiguous(memory_format=torch.channels_last)
            local_map, global_map = self.model.features(xs)
            if s in self.global_scales:
                g_sum = g_sum + self.model.global_descriptor(global_map).float()
            attn, desc = self.model.local_head(local_map)
            if self.cfg.keypoint_score != "attention":  # see ExtractConfig.keypoint_score
                norm = local_map.float().norm(dim=1)
                attn = norm if self.cfg.keypoint_score == "norm" else attn * norm
            h, w = attn.shape[-2:]
            sy, sx = xs.shape[-2] / H, xs.shape[-1] / W  # actual scale after rounding
            ys = (torch.arange(h, device=self.device, dtype=torch.float32) * stride + (stride - 1) / 2) / sy
            xs_ = (torch.arange(w, device=self.device, dtype=torch.float32) * stride + (stride - 1) / 2) / sx
            grid = torch.stack(torch.meshgrid(xs_, ys, indexing="xy"), dim=-1).reshape(-1, 2)  # (x, y), bucket px
            scores.append(attn.float().reshape(B, -1))
            descs.append(desc.float().flatten(2).transpose(1, 2))  # [B x hw x d]
            locs.append(grid.expand(B, -1, -1))
            scl.append(torch.full((B, h * w), s, device=self.device))
        g = F.normalize(g_sum, dim=-1).cpu().numpy()
        scores, descs = torch.cat(scores, 1), torch.cat(descs, 1)
        locs, scl = torch.cat(locs, 1), torch.cat(scl, 1)
        k = min(self.max_local, scores.shape[1])
        top, idx = scores.topk(k, dim=1)
        sel_desc = descs.gather(1, idx[..., None].expand(-1, -1, descs.shape[-1])).cpu().numpy()
        sel_loc = locs.gather(1, idx[..., None].expand(-1, -1, 2)).cpu().numpy()
        sel_scl = scl.gather(1, idx).cpu().numpy()
        top = top.cpu().numpy()
        out = []
        for b, (ow, oh) in enumerate(sizes):
            keep = top[b] >= self.cfg.attention_threshold
            kp = np.clip(sel_loc[b][keep] * np.array([ow / W, oh / H], np.float32), 0, [ow - 1, oh - 1])
            out.append(Features(g[b], kp.astype(np.float32), sel_desc[b][keep], top[b][keep], sel_scl[b][keep],
                                (ow, oh)))
        return out

    # ---------------------------------------------------------------------------------------------- API
    def extract_one(self, image) -> Features:
        """One image at a time (the reference code's way); same preprocessing as the batched path."""
        arr, size = self.prepare(image)
        return self._run(arr[None], [size])[0]

    def extract(self, images: Sequence, progress=None) -> list[Features]:
        """Batched: images are prepared in background threads, grouped by bucket size, and run together."""
        prepared = self._pool.map(self.prepare, images)
        results: list[Features | None] = [None] * len(images)
        pending: dict[tuple[int, int], list[tuple[int, np.ndarray, tuple[int, int]]]] = {}
        done = 0
        for i, (arr, size) in enumerate(prepared):
            key = arr.shape[:2]
            pending.setdefault(key, []).append((i, arr, size))
            if len(pending[key]) == self.cfg.batch_size:
                done += self._flush(pending.pop(key), results)
                progress and progress(done)
        for group in list(pending.values()):
            done += self._flush(group, results)
            progress and progress(done)
        return results  # type: ignore[return-value]

    def _flush(self, group, results) -> int:
        feats = self._run(np.stack([a for _, a, _ in group]), [s for *_, s in group])
        for (i, _, _), f in zip(group, feats):
            results[i] = f
        return len(group)
