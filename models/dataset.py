"""Training images from a dataset manifest, as tensors."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torchvision.transforms import v2

from data.images import load_rgb


def _load_small(path: Path, short_side: int) -> torch.Tensor:
    """Decode and shrink so the short side is `short_side`: uint8 [3 x H x W]."""
    img = Image.fromarray(load_rgb(path))
    scale = short_side / min(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.BILINEAR, reducing_gap=2.0)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


class ImageSet(torch.utils.data.Dataset):
    """Rows of a manifest with integer labels; images decoded once and kept small in memory.

    train=True: random resized crop (no flips: text and logos must stay readable) and colour jitter.
    train=False: resize to size x size. Items: (normalised [3 x S x S] float, label).
    """

    def __init__(self, folder: Path, rows: pd.DataFrame, labels: np.ndarray, size: int, train: bool,
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_scale_min: float = 0.35, color_jitter: float = 0.2,
                 workers: int = 2):
        self.labels = torch.tensor(np.asarray(labels, dtype=np.int64))
        paths = [Path(folder) / p for p in rows["path"]]
        with ThreadPoolExecutor(max(1, workers)) as pool:
            self.images = list(pool.map(lambda p: _load_small(p, int(size * 1.15)), paths))
        if train:
            self.transform = v2.Compose([
                v2.RandomResizedCrop(size, scale=(crop_scale_min, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
                v2.ColorJitter(color_jitter, color_jitter, color_jitter),
                v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
        else:
            self.transform = v2.Compose([v2.Resize((size, size), antialias=True),
                                         v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.labels[i]
