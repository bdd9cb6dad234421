"""What extraction produces, and its compact form (torch-free: the index store and the re-ranker use it
without loading the network)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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


def pack_keypoints(keypoints: np.ndarray) -> np.ndarray:
    """Keypoints as uint16 pixels [N x 2]."""
    return np.clip(np.rint(keypoints), 0, 65535).astype(np.uint16)


def pack_descriptors(descriptors: np.ndarray) -> np.ndarray:
    """Unit descriptors as int8 (x * 127: exact range) [N x d]; int8 input is already packed."""
    if descriptors.dtype == np.int8:
        return descriptors
    return np.clip(np.rint(descriptors * QUANT), -127, 127).astype(np.int8)


def pack_local(f: Features) -> tuple[np.ndarray, np.ndarray]:
    """(keypoints uint16 [N x 2], descriptors int8 [N x d]) — 1/4 of float32 storage."""
    return pack_keypoints(f.keypoints), pack_descriptors(f.descriptors)


def unpack_local(kp: np.ndarray, desc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = desc.astype(np.float32) / QUANT
    d /= np.linalg.norm(d, axis=1, keepdims=True).clip(min=1e-6)
    return kp.astype(np.float32), d


def recognition_score(inliers: np.ndarray, cosine: np.ndarray) -> np.ndarray:
    """DELG's GLDv2 score: min(70, inliers) / 70 + 0.25 * cosine."""
    return np.minimum(70, inliers) / 70.0 + 0.25 * cosine
