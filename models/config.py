"""Settings of the model layer (params.yaml sections `model`, `train`, `extract`, `rerank`)."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from data.config import check_ranges, from_params
from data.errors import IlrError


@dataclass
class ModelConfig:
    backbone: str = "tf_efficientnet_lite0"   # any timm model with features_only; lite0/lite2 load offline
    pretrained: bool = True
    dim: int = 512                            # global descriptor size D (paper: 2048 on ResNet)
    local_dim: int = 0                        # autoencoder size; 0 = 128, or 64 when the stage has < 256 channels
    global_descriptor: str = "learned+gem"    # learned+gem: an ensemble of the backbone's own GeM descriptor and
                                              # the learned one, [gem_weight * GeM ; whiten(GeM)] (each L2-
                                              # normalised, then the whole): a fine-tuned model keeps ImageNet's
                                              # view beside what it learned; learned: whiten(GeM) alone (DELG)
                                              # (BENCHMARKS.md "Fine-tuning options")
    gem_weight: float = 1.5                   # learned+gem: weight of the GeM half
    local_descriptors: str = "backbone"       # backbone: the stage's own features, L2-normalised (as off the
                                              # shelf; they match real photos better after fine-tuning on small
                                              # or synthetic data); learned: the autoencoder's code (DELG)
    attention_hidden: int = 0                 # 0 = 512, or 256 when the stage has < 256 channels
    gem_p: float = 3.0
    arcface_margin: float = 0.1
    arcface_scale: float = 0.0                # 0 = sqrt(dim), as the paper
    subcenters: int = 1                       # > 1: sub-center ArcFace
    dynamic_margins: bool = False             # class-frequency margins (GLR 2020/2021 winners)
    attention_loss_weight: float = 1.0
    reconstruction_loss_weight: float = 10.0
    mean: tuple[float, float, float] | None = None   # None = the backbone's pretrained normalisation (timm)
    std: tuple[float, float, float] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainConfig:
    steps: int = 40
    batch_size: int = 16
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    clip_grad_norm: float = 10.0
    # keeping what ImageNet gave the backbone when the training data is small or synthetic (real photos
    # are the target): a lower learning rate for the backbone than for the new heads, its earliest blocks
    # frozen, and its BatchNorm statistics kept (small batches of one domain would overwrite them)
    # (BENCHMARKS.md "Fine-tuning that keeps ImageNet": 60 steps on synthetic-small, realdev global mAP
    # 0.965 plain vs 0.994 kept, off-the-shelf 0.998)
    backbone_lr_mult: float = 0.1
    freeze_blocks: int = 3                    # backbone children frozen from the input side (stem counts)
    freeze_bn: bool = True
    l2sp: float = 0.0                         # L2-SP (Li et al., ICML 2018): alpha/2 x ||w - w_pretrained||^2 on the
                                              # trainable backbone weights, in place of weight decay toward zero
    distill: float = 0.0                      # feature distillation toward the frozen pretrained backbone (LwF /
                                              # DELTA style, on the training images): weight x the mean
                                              # (1 - cosine) of its GeM descriptors and of its local-stage
                                              # descriptors, student vs the ImageNet backbone
    whiten_init: str = "random"               # random: PyTorch's default initialisation; identity: the whitening
                                              # layer starts as the off-the-shelf GeM descriptor (zero-padded to
                                              # model.dim): better on pkg-photos, worse on realdev and synthetic
                                              # after 60 steps (BENCHMARKS.md)
    image_size: int = 224
    crop_scale_min: float = 0.35
    color_jitter: float = 0.2
    val_every: int = 20
    checkpoint_every: int = 20
    seed: int = 0
    workers: int = 2
    device: str = "auto"                      # auto | cpu | cuda
    amp: bool = True                          # mixed precision on CUDA
    experiment: str = "ilr-delg"

    def __post_init__(self):
        check_ranges("train", self, {"steps": 1, "batch_size": 1, "val_every": 1, "checkpoint_every": 1,
                                      "workers": 0, "freeze_blocks": 0}, positive=("lr",))


@dataclass
class ExtractConfig:
    max_side_px: int = 384                    # longest side cap (paper: 1024; CPU default smaller)
    scales: tuple[float, ...] = (0.7071, 1.0, 1.4142)   # global descriptor scales; local uses them too
    local_scales: tuple[float, ...] = ()      # extra local-only scales (paper: 0.25 ... 2.0); () = same as global
    max_local_features: int = 0               # 0 = 1000 on CUDA, 500 on CPU
    attention_threshold: float = 0.0          # keep only keypoints with a score >= this
    keypoint_score: str = "norm"              # norm | attention | attention_x_norm: what ranks keypoints
    batch_size: int = 8                       # images per forward pass on GPU
    cpu_batch_size: int = 1                   # on CPU: per image is fastest (a 384 px pyramid about fills the
                                              # cache; batch 8 is 0.7x per image on 2 cores, BENCHMARKS.md)
    bucket_px: int = 32                       # images are resized to sides that are multiples of this
    device: str = "auto"
    cpu_threads: int = 0                      # 0 = measure once and pick the faster of 1 or all cores
    channels_last: bool = True                # NHWC tensors on CPU (faster oneDNN convolutions)
    optimize: bool = True                     # extract with a folded inference copy (models.extract.inference_copy)
    cpu_runtime: str = "onnx"                 # onnx | torch: what runs the backbone on CPU (optimize only)

    def __post_init__(self):
        check_ranges("extract", self, {"max_side_px": 1, "max_local_features": 0, "batch_size": 1,
                                       "cpu_batch_size": 1, "bucket_px": 1, "cpu_threads": 0})
        if not self.scales or any(not x > 0 for x in (*self.scales, *self.local_scales)):
            raise IlrError(f"extract.scales must be one or more numbers above 0 (extract.local_scales too), got "
                           f"{list(self.scales)} and {list(self.local_scales)}", hint="`extract.scales` in params.yaml")

    def local_count(self, device: str) -> int:
        return self.max_local_features or (1000 if device.startswith("cuda") else 500)


@dataclass
class RerankConfig:
    top_k: int = 50                           # global top-K re-ranked per query, by evaluation, the gate and the
                                              # service alike (DELG: 100; on 2 CPU cores 50 halves re-ranking
                                              # time for the same mAP on the embedded data: BENCHMARKS.md)
    max_distance: float = 0.9                 # descriptor L2 distance bound (DELG: 0.9-1.0)
    ratio: float = 0.9                        # Lowe's ratio test on top of mutual NN (1.0 = off): drops
                                              # ambiguous matches on repeated textures (BENCHMARKS.md)
    ransac: str = "magsac"                    # magsac | ransac (OpenCV), affine model
    ransac_threshold_px: float = 20.0         # at images whose longest side is threshold_reference_px
    threshold_reference_px: int = 384         # larger images get a proportionally larger threshold
    ransac_iters: int = 1000
    min_inliers: int = 4
    score: str = "fused"                      # fused: cos + inlier_weight * min(inliers, inlier_cap) / inlier_cap;
                                              # inliers_first: DELG's order by (inliers, cos)
    inlier_weight: float = 0.5                # geometric evidence vs global similarity in the fused score
    inlier_cap: int = 70                      # inliers beyond this add nothing (DELG's recognition cap)
    inlier_floor: int = 8                     # inliers up to this add nothing: the chance level of an affine
                                              # RANSAC on unrelated real photos (their 99th percentile, 8-9)
    refine: str = "superglobal"               # global similarities of the top-K refined before fusion:
                                              # superglobal (neighbours among the top-K + query expansion),
                                              # aqe (alpha query expansion) or none
    refine_k: int = 2                         # superglobal: a candidate and its nearest other candidate;
                                              # aqe: the top refine_k results expand the query
    aqe_alpha: float = 3.0                    # aqe: weight of a result = max(cos, 0) ** alpha
    workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 2))

    def __post_init__(self):
        check_ranges("rerank", self, {"top_k": 1, "ransac_iters": 1, "min_inliers": 0, "inlier_cap": 1,
                                      "inlier_floor": 0, "refine_k": 1, "workers": 1, "threshold_reference_px": 1},
                     positive=("max_distance", "ransac_threshold_px"))


@dataclass
class GateConfig:
    """The promotion gate (params.yaml `gate`)."""
    margin: float = 0.0                       # the challenger must beat the champion by more than this, on the
                                              # target dataset, at the lower end of the bootstrap interval
    suites: list = field(default_factory=list)  # golden suites (dataset NAME or NAME@vN, real photos): none may
    max_regression: float = 0.01                # regress by more than this (served or global mAP)
    bootstrap: int = 1000                     # paired bootstrap resamples over the target's queries
    confidence: float = 0.95                  # of the bootstrap interval

    def __post_init__(self):
        check_ranges("gate", self, {"max_regression": 0, "bootstrap": 1}, positive=("confidence",),
                     at_most={"confidence": 1})


def gate_config(**kw) -> GateConfig:
    return from_params(GateConfig, "gate", **kw)


@dataclass
class TuneConfig:
    trials: int = 4
    steps: int = 0                           # per trial; 0 = train.steps
    val_every: int = 0                       # 0 = train.val_every
    cpus_per_trial: float = 0.5
    gpus_per_trial: float = 0.0              # > 0 only takes effect where the cluster has GPUs
    max_concurrent: int = 0                  # 0 = as many as the resources allow
    grace_period: int = 1                    # ASHA: validations before a trial can be stopped
    reduction_factor: int = 2
    seed: int = 0
    max_failures: int = 3                    # a trial whose worker or node died is retried from its last
                                             # checkpoint this many times (Ray Tune's FailureConfig)
    space: dict = field(default_factory=lambda: {
        "lr": ["loguniform", 0.003, 0.05],
        "arcface_margin": ["uniform", 0.05, 0.3],
        "arcface_scale": ["choice", [0.0, 16.0, 32.0]],
        "dim": ["choice", [256, 512]],
        "image_size": ["choice", [160, 224]],
        "gem_p": ["uniform", 2.0, 4.0],
        "attention_loss_weight": ["uniform", 0.5, 2.0],
        "reconstruction_loss_weight": ["choice", [1.0, 10.0]],
    })

    def __post_init__(self):
        check_ranges("tune", self, {"trials": 1, "steps": 0, "val_every": 0, "gpus_per_trial": 0,
                                     "max_concurrent": 0, "grace_period": 1, "reduction_factor": 2,
                                     "max_failures": 0}, positive=("cpus_per_trial",))


def tune_config(**kw) -> TuneConfig:
    return from_params(TuneConfig, "tune", **kw)


def model_config(**kw) -> ModelConfig:
    return from_params(ModelConfig, "model", **kw)


def train_config(**kw) -> TrainConfig:
    return from_params(TrainConfig, "train", **kw)


def extract_config(**kw) -> ExtractConfig:
    return from_params(ExtractConfig, "extract", **kw)


def rerank_config(**kw) -> RerankConfig:
    return from_params(RerankConfig, "rerank", **kw)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
