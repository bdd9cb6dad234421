"""See gpu_check.sh. Self-contained: generated images, no dataset versioning, no MLflow."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.config import ExtractConfig, ModelConfig  # noqa: E402
from models.delg import DELG  # noqa: E402
from models.extract import Extractor  # noqa: E402


def train_steps(backbone: str, steps: int, batch: int, size: int) -> None:
    torch.manual_seed(0)
    classes = 100
    model = DELG(ModelConfig(backbone=backbone, dim=512), num_classes=classes,
                 load_pretrained=backbone.startswith("tf_efficientnet")).cuda().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    x = torch.randn(batch, 3, size, size, device="cuda")
    y = torch.randint(0, classes, (batch,), device="cuda")
    losses = []
    for step in range(steps + 10):
        if step == 10:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=dtype):
            out = model.losses(x, y)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        losses.append(float(out["loss"].detach()))
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print(f"train {backbone}: {steps} AMP ({dtype}) steps, batch {batch} at {size}px: {steps / dt:.1f} steps/s, "
          f"{steps * batch / dt:.0f} img/s; loss {losses[0]:.2f} -> {losses[-1]:.2f}", flush=True)


def extraction(backbone: str, n: int = 128) -> None:
    rng = np.random.default_rng(0)
    imgs = [np.ascontiguousarray(rng.integers(0, 255, (384, 512, 3), dtype=np.uint8)) for _ in range(n)]
    model = DELG(ModelConfig(backbone=backbone), load_pretrained=backbone.startswith("tf_efficientnet"))
    for bs in (1, 32):
        ex = Extractor(model, ExtractConfig(max_side_px=512, batch_size=bs, device="cuda"))
        ex.extract(imgs[:bs])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if bs == 1:
            feats = [ex.extract_one(i) for i in imgs]
        else:
            feats = ex.extract(imgs)
        torch.cuda.synchronize()
        print(f"extract {backbone} 512px, 3 scales, {ex.max_local} local: batch {bs}: "
              f"{n / (time.perf_counter() - t0):.1f} img/s ({len(feats[0].keypoints)} keypoints)", flush=True)


if __name__ == "__main__":
    assert torch.cuda.is_available(), "no CUDA device"
    print(torch.cuda.get_device_name(0), "torch", torch.__version__, flush=True)
    for bb in ("tf_efficientnet_lite0", "resnet50"):
        train_steps(bb, steps=300, batch=32, size=321)
        extraction(bb)
