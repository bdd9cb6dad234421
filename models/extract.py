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

import copy
import io
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from data.images import load_rgb
from models.config import ExtractConfig, extract_config, resolve_device
from models.delg import DELG

from models.features import Features


def bucket_size(width: int, height: int, max_side: int, bucket: int) -> tuple[int, int]:
    """Target (width, height): longest side <= max_side, both multiples of `bucket`, aspect kept roughly."""
    scale = min(1.0, max_side / max(width, height))
    return (max(bucket, int(round(width * scale / bucket)) * bucket),
            max(bucket, int(round(height * scale / bucket)) * bucket))


def with_cpu_threads(ecfg: ExtractConfig, sharing: int = 1, threads: int = 0) -> ExtractConfig:
    """The CPU-thread policy of extraction in a Ray worker (a Serve replica, a Ray Data actor): Ray pins a
    fractional-CPU worker's math libraries to one thread (OMP_NUM_THREADS=1), so the count is set here:
    `extract.cpu_threads` when set, else `threads`, else the machine's cores shared by the `sharing`
    extractions that run at once. (In-process, cpu_threads 0 lets the Extractor time 1 vs all cores.)"""
    if ecfg.cpu_threads:
        return ecfg
    import dataclasses

    return dataclasses.replace(ecfg, cpu_threads=threads or max(1, (os.cpu_count() or 1) // max(1, sharing)))


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


@torch.no_grad()
def fold_batchnorm(model: torch.nn.Module) -> int:
    """Fold eval-mode BatchNorm into the convolution it follows (consecutive children of one module, as in
    timm's blocks and the attention head): one op less per layer at inference. timm's BatchNormAct2d keeps its
    activation. Returns the number of folded layers."""
    folded = 0
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if not (isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d)
                    and bn.running_var is not None and conv.out_channels == bn.num_features):
                continue
            scale = torch.rsqrt(bn.running_var + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight
            shift = -bn.running_mean * scale + (bn.bias if bn.bias is not None else 0)
            bias = conv.bias * scale + shift if conv.bias is not None else shift
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            conv.bias = torch.nn.Parameter(bias.detach().clone())
            after = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
            setattr(parent, bn_name, torch.nn.Sequential(*after) if after else torch.nn.Identity())
            folded += 1
    return folded


class OneDNNPointwise(torch.nn.Module):
    """A stride-1 1x1 convolution that takes PyTorch's oneDNN path on CPU. With one intra-op thread PyTorch
    runs batch-1 1x1 convolutions through its generic im2col+GEMM code (1.6x slower here; most convolutions
    of a MobileNet/EfficientNet are 1x1). A 1x1 kernel gives the same result at any dilation, and a dilated
    convolution takes oneDNN — except for inputs of <= 20480 elements at batch 1, where PyTorch would pick
    its (very slow) dilated fallback, so those stay undilated."""

    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__()
        self.weight, self.bias, self.groups = conv.weight, conv.bias, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dilation = 2 if x.shape[0] > 1 or x.numel() > 20480 else 1
        return F.conv2d(x, self.weight, self.bias, 1, 0, dilation, self.groups)


class SamePadConv(torch.nn.Module):
    """TF-"same" convolution (timm's Conv2dSame, used by the tf_ EfficientNets) without a padded copy of the
    input when the padding is symmetric: it is handed to the convolution (oneDNN pads internally)."""

    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__()
        self.weight, self.bias, self.groups = conv.weight, conv.bias, conv.groups
        self.stride, self.dilation, self.kernel_size = conv.stride, conv.dilation, conv.kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            pads.append(max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0))
        ph, pw = pads
        if ph % 2 == 0 and pw % 2 == 0:
            return F.conv2d(x, self.weight, self.bias, self.stride, (ph // 2, pw // 2), self.dilation, self.groups)
        left, top = pw // 2, ph // 2
        x = F.pad(x, (left, pw - left, top, ph - top))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def speed_up_convolutions(model: torch.nn.Module) -> int:
    """Replace stride-1 1x1 convolutions by OneDNNPointwise and timm's Conv2dSame by SamePadConv (same
    results); returns how many were replaced."""
    from timm.layers import Conv2dSame

    n = 0
    for parent in list(model.modules()):
        for name, m in list(parent.named_children()):
            if not isinstance(m, torch.nn.Conv2d) or m.padding_mode != "zeros":
                continue
            pointwise = m.kernel_size == (1, 1) and m.stride == (1, 1) and m.dilation == (1, 1)
            if pointwise and (isinstance(m, Conv2dSame) or m.padding in ((0, 0), "valid", "same")):
                setattr(parent, name, OneDNNPointwise(m))
            elif isinstance(m, Conv2dSame):
                setattr(parent, name, SamePadConv(m))
            else:
                continue
            n += 1
    return n


def inference_copy(model: DELG, device: str, channels_last: bool) -> DELG:
    """A copy of the model for extraction only (the caller's model, e.g. one being trained, is untouched):
    BatchNorm folded, and on CPU the oneDNN path for 1x1 convolutions, cheaper "same" padding and NHWC tensors."""
    model = copy.deepcopy(model).eval()
    fold_batchnorm(model)
    if device == "cpu":
        speed_up_convolutions(model)
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


class OnnxBackbone:
    """The backbone's forward pass in ONNX Runtime, for CPU extraction: 1.4-1.7x PyTorch's (folded, oneDNN)
    on lite0 at one thread, outputs equal within 1e-4 (BENCHMARKS.md). Exported from a BatchNorm-folded copy
    of the backbone (the heads stay in torch) with dynamic batch, height and width ("same" padding stays size-dependent in the graph). ORT sessions
    may be run from several threads at once; each call uses `threads` threads (1 = the calling thread)."""

    def __init__(self, model: DELG, threads: int):
        import onnxruntime as ort

        backbone = copy.deepcopy(model.backbone).eval().cpu()
        fold_batchnorm(backbone)
        buf = io.BytesIO()
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
            warnings.simplefilter("ignore")
            torch.onnx.export(backbone, (torch.zeros(1, 3, 64, 64),), buf, input_names=["x"],
                              dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}}, opset_version=17, dynamo=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = max(1, threads), 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-waiting beside torch
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = self.session.run(None, {"x": x.contiguous().numpy()})
        return tuple(torch.from_numpy(o) for o in outs)


class Extractor:
    """Wraps a DELG model for inference on lists of images (RGB uint8 arrays or file paths)."""

    def __init__(self, model: DELG, cfg: ExtractConfig | None = None, device: str | None = None):
        self.cfg = cfg or extract_config()
        self.device = resolve_device(device or self.cfg.device)
        self.channels_last = self.device == "cpu" and self.cfg.channels_last
        if self.cfg.optimize:
            self.model = inference_copy(model, self.device, self.channels_last)
        else:  # the model as trained (benchmarks' reference way)
            self.model = model.eval().to(self.device)
            if self.channels_last:
                self.model = self.model.to(memory_format=torch.channels_last)
        self.batch_size = max(1, self.cfg.batch_size if self.device.startswith("cuda") else self.cfg.cpu_batch_size)
        self.threads = 0
        if self.device == "cpu":
            self.threads = self.cfg.cpu_threads or best_cpu_threads(os.cpu_count() or 1)
            torch.set_num_threads(self.threads)
        self.max_local = self.cfg.local_count(self.device)
        # the backbone in ONNX Runtime on CPU (see OnnxBackbone); heads, pooling and selection stay in torch
        self.onnx = OnnxBackbone(model, self.threads) if (self.device == "cpu" and self.cfg.optimize and
                                                          self.cfg.cpu_runtime == "onnx") else None
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
        if self.threads and torch.get_num_threads() != self.threads:
            # OpenMP's thread count is per calling thread: a worker thread (asyncio.to_thread in the service,
            # Ray Data's actor threads) would otherwise run with its own default
            torch.set_num_threads(self.threads)
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device).permute(0, 3, 1, 2).float().div_(255)
        x = (x - self.mean) / self.std
        B, _, H, W = x.shape
        g_sum = 0
        scores, descs, locs, scl = [], [], [], []
        stride = self.model.local_stride
        for s in self.local_scales:
            xs = x if s == 1.0 else F.interpolate(x, size=(max(stride, round(H * s)), max(stride, round(W * s))),
                                                  mode="bilinear", align_corners=False, antialias=s < 1)
            if self.onnx is not None:
                local_map, global_map = self.onnx(xs)
            else:
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
            if len(pending[key]) == self.batch_size:
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
