"""DELG training on a dataset version, tracked in MLflow, with checkpoints and resume.

SGD (momentum 0.9), learning rate linearly decayed to 0, gradient-norm clipping at 10, AMP on CUDA.
Since the local losses reach only the local head (stop-gradient), the clipping is applied to the global
part (backbone + global head) and to the local head separately, so that the reconstruction loss's large
gradients cannot shrink the backbone's steps.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from data import manifest
from data.config import NO_LABEL, ilr_home
from data.errors import IlrError
from data.versioning import Version, dataset_dir
from models import registry, tracking
from models.config import ModelConfig, TrainConfig, model_config, resolve_device, train_config
from models.dataset import ImageSet
from models.delg import DELG
from models.metrics import average_precision

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_id: str
    model_dir: Path
    metrics: dict
    steps: int
    dataset: Version
    model_uri: str = ""      # the logged MLflow model (register it with models.registry.register)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _flat(prefix: str, d: dict) -> dict:
    return {f"{prefix}.{k}": (json.dumps(v) if isinstance(v, (list, tuple, dict)) else v) for k, v in d.items()}


def _freeze(model: DELG, tcfg: TrainConfig) -> str:
    """Freeze the first `freeze_blocks` children of the backbone (for timm's EfficientNets: conv_stem, bn1,
    blocks.0, ...; a block list counts each block). Returns what was frozen, for the log."""
    names = []
    for name, child in model.backbone.named_children():
        parts = list(child.named_children()) if name == "blocks" else [(name, child)]
        for sub, mod in parts:
            if len(names) >= tcfg.freeze_blocks:
                break
            mod.requires_grad_(False)
            names.append(sub if name != "blocks" else f"blocks.{sub}")
    return ", ".join(names)


def _init_whitening(model: DELG, tcfg: TrainConfig) -> None:
    """whiten_init identity: whiten(GeM) starts equal to the off-the-shelf descriptor (an identity on the
    first min(D, C5) channels, zero elsewhere)."""
    if tcfg.whiten_init == "random":
        return
    if tcfg.whiten_init != "identity":
        raise IlrError(f"unknown train.whiten_init {tcfg.whiten_init!r}: identity | random")
    with torch.no_grad():
        w = model.whiten.weight
        w.copy_(torch.eye(w.shape[0], w.shape[1], dtype=w.dtype, device=w.device))
        model.whiten.bias.zero_()


def _train_mode(model: DELG, tcfg: TrainConfig) -> None:
    """model.train(), except the backbone's BatchNorm layers when their statistics are kept."""
    model.train()
    if tcfg.freeze_bn:
        for m in model.backbone.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def _teacher(model: DELG) -> torch.nn.Module:
    """A frozen copy of the backbone as it is before any step (the pretrained weights), in eval mode: what
    `train.distill` keeps the served descriptors close to on the training images."""
    import copy

    teacher = copy.deepcopy(model.backbone).eval()
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def validate(model: DELG, val: ImageSet, train_eval: ImageSet, device: str, batch_size: int = 32) -> dict:
    """Retrieval on held-out views of the training classes: each val image queries the train images.

    Returns val_map (mean AP over val images, positives = same class) and val_top1 (kNN@1 accuracy)."""
    model.eval()

    def embed(ds: ImageSet) -> torch.Tensor:
        out = []
        for i in range(0, len(ds), batch_size):
            x = torch.stack([ds[j][0] for j in range(i, min(len(ds), i + batch_size))]).to(device)
            out.append(model.global_descriptor(model.features(x)[1]).float().cpu())
        return torch.cat(out)

    q, db = embed(val), embed(train_eval)
    sims = q @ db.T
    order = sims.argsort(dim=1, descending=True).numpy()
    rel = (train_eval.labels.numpy()[order] == val.labels.numpy()[:, None])
    aps = [average_precision(np.flatnonzero(r), int(r.sum())) for r in rel if r.any()]
    model.train()
    return {"val_map": float(np.mean(aps)) if aps else 0.0, "val_top1": float(rel[:, 0].mean())}


def _run_key(dataset_md5: str, mcfg: ModelConfig, tcfg: TrainConfig) -> str:
    blob = json.dumps([dataset_md5, asdict(mcfg), asdict(tcfg)], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def train(dataset: str, mcfg: ModelConfig | None = None, tcfg: TrainConfig | None = None,
          checkpoint_dir: Path | None = None, report: Callable[[dict], None] | None = None,
          log_fn: Callable[[str], None] = print, parent_run_id: str | None = None,
          run_name: str | None = None) -> TrainResult:
    """Train DELG on NAME[@VERSION]; resumes from checkpoint_dir when it holds a checkpoint of the same
    configuration and data. `report(metrics)` is called at each validation (Ray Tune)."""
    import mlflow

    mcfg, tcfg = mcfg or model_config(), tcfg or train_config()
    version, folder = dataset_dir(dataset)
    df = manifest.read(folder)
    train_rows = df[(df["split"] == "train") & (df["label"] != NO_LABEL)].reset_index(drop=True)
    val_rows = df[(df["split"] == "val") & df["label"].isin(set(train_rows["label"]))].reset_index(drop=True)
    if train_rows["label"].nunique() < 2:
        raise IlrError(f"dataset {version.ref} has {train_rows['label'].nunique()} training class(es); need >= 2")
    classes = sorted(train_rows["label"].unique())
    index = {c: i for i, c in enumerate(classes)}
    y_train = train_rows["label"].map(index).to_numpy()
    counts = torch.as_tensor(np.bincount(y_train, minlength=len(classes)))

    seed_everything(tcfg.seed)
    device = resolve_device(tcfg.device)
    model = DELG(mcfg, num_classes=len(classes), class_counts=counts).to(device)
    _init_whitening(model, tcfg)
    _train_mode(model, tcfg)
    kw = dict(mean=model.cfg.mean, std=model.cfg.std, workers=tcfg.workers)
    train_set = ImageSet(folder, train_rows, y_train, tcfg.image_size, train=True,
                         crop_scale_min=tcfg.crop_scale_min, color_jitter=tcfg.color_jitter, **kw)
    val_set = ImageSet(folder, val_rows, val_rows["label"].map(index).to_numpy(), tcfg.image_size, False, **kw) \
        if len(val_rows) else None
    train_eval = ImageSet(folder, train_rows, y_train, tcfg.image_size, False, **kw) if val_set else None

    frozen = _freeze(model, tcfg)
    local = [p for n, p in model.named_parameters() if n.startswith(("attention.", "autoencoder.",
                                                                      "attention_classifier."))]
    local_ids = {id(p) for p in local}
    glob = [p for p in model.parameters() if id(p) not in local_ids and p.requires_grad]
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    backbone_ids = {id(p) for p in backbone}
    heads = [p for p in model.parameters() if id(p) not in backbone_ids and p.requires_grad]
    # L2-SP: the backbone decays toward its pretrained weights (snapshotted before any step) instead of zero
    anchors = [p.detach().clone() for p in backbone] if tcfg.l2sp > 0 else []
    teacher = _teacher(model) if tcfg.distill > 0 else None
    opt = torch.optim.SGD([{"params": heads},
                           {"params": backbone, "lr": tcfg.lr * tcfg.backbone_lr_mult,
                            "weight_decay": 0.0 if anchors else tcfg.weight_decay}],
                          lr=tcfg.lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay)
    if frozen:
        log_fn(f"backbone: {frozen} frozen from the input side; lr x {tcfg.backbone_lr_mult}; "
               f"BatchNorm statistics {'kept' if tcfg.freeze_bn else 'trained'}"
               + (f"; L2-SP {tcfg.l2sp} toward the pretrained weights" if anchors else "")
               + (f"; distillation {tcfg.distill} toward the pretrained features" if teacher else ""))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / tcfg.steps))
    use_amp = tcfg.amp and device.startswith("cuda")
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    key = _run_key(version.dvc_md5, mcfg, tcfg)
    ckpt_dir = Path(checkpoint_dir or ilr_home() / "checkpoints" / key)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = ckpt_dir / "checkpoint.pt"
    step, run_id, metrics = 0, None, {}
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        step, run_id = int(ck["step"]), ck.get("run_id") or None
        metrics = {k: float(v) for k, v in ck.get("metrics", {}).items()}  # the last validation's
        torch.set_rng_state(ck["rng"])
        log_fn(f"resuming from step {step} ({ckpt_path})")

    tracking.setup(tcfg.experiment)
    g = torch.Generator().manual_seed(tcfg.seed + step)
    loader = torch.utils.data.DataLoader(train_set, batch_size=min(tcfg.batch_size, len(train_set)), shuffle=True,
                                         drop_last=True, generator=g, num_workers=0)
    run_file = ckpt_dir / "mlflow_run_id"  # written at once: an interruption before the first checkpoint
    if run_id is None and run_file.exists():  # still resumes the same MLflow run
        run_id = run_file.read_text().strip() or None
    run_kw = {"run_id": run_id} if run_id else {"run_name": run_name}
    if parent_run_id and not run_id:
        run_kw["nested"] = True
        run_kw["parent_run_id"] = parent_run_id
    with mlflow.start_run(**run_kw) as run:
        run_id = run.info.run_id
        run_file.write_text(run_id)
        if step == 0:
            mlflow.log_params({**_flat("model", asdict(mcfg)), **_flat("train", asdict(tcfg)),
                               "num_classes": len(classes), "train_images": len(train_rows),
                               "val_images": len(val_rows), "device": device})
            mlflow.set_tags({"dataset": version.name, "dataset.version": version.version,
                             "dataset.dvc_md5": version.dvc_md5, "dataset.git_rev": version.git_rev,
                             "git_sha": tracking.git_sha(), "ilr.kind": "train"})
        t0 = time.perf_counter()
        while step < tcfg.steps:
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with torch.autocast("cuda", dtype=amp_dtype, enabled=use_amp):
                    losses = model.losses(x, y, teacher, tcfg.distill)
                if anchors:
                    drift = sum(((p.float() - a) ** 2).sum() for p, a in zip(backbone, anchors))
                    losses["l2sp"] = 0.5 * tcfg.l2sp * drift
                    losses["loss"] = losses["loss"] + losses["l2sp"]
                opt.zero_grad(set_to_none=True)
                scaler.scale(losses["loss"]).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(glob, tcfg.clip_grad_norm)
                torch.nn.utils.clip_grad_norm_(local, tcfg.clip_grad_norm)
                scaler.step(opt)
                scaler.update()
                sched.step()
                step += 1
                mlflow.log_metrics({k: float(v.detach()) for k, v in losses.items()} | {"lr": sched.get_last_lr()[0]},
                                   step=step)
                if val_set is not None and (step % tcfg.val_every == 0 or step == tcfg.steps):
                    metrics = validate(model, val_set, train_eval, device)
                    _train_mode(model, tcfg)
                    mlflow.log_metrics(metrics, step=step)
                    log_fn(f"step {step}/{tcfg.steps} loss {float(losses['loss'].detach()):.3f} "
                           f"val_map {metrics['val_map']:.3f} val_top1 {metrics['val_top1']:.3f} "
                           f"({time.perf_counter() - t0:.0f}s)")
                if step % tcfg.checkpoint_every == 0 or step == tcfg.steps:
                    tmp = ckpt_path.with_suffix(".tmp")
                    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                "scheduler": sched.state_dict(), "step": step, "run_id": run_id,
                                "rng": torch.get_rng_state(), "metrics": metrics}, tmp)
                    tmp.replace(ckpt_path)
                if report and val_set is not None and (step % tcfg.val_every == 0 or step == tcfg.steps):
                    report({**metrics, "step": step, "checkpoint_dir": str(ckpt_dir)})
                if step >= tcfg.steps:
                    break
        if val_set is not None and not metrics:
            # resumed from the last step's checkpoint (interrupted between it and the end, e.g. a search
            # stopped before the trial's final report) written before checkpoints kept the validation
            metrics = validate(model, val_set, train_eval, device)
        info = registry.log_model(model.cpu(), ckpt_dir / "model",
                                  {"dataset": version.ref, "dataset_dvc_md5": version.dvc_md5,
                                   "classes": len(classes)})
        mlflow.log_metrics({f"final_{k}": v for k, v in metrics.items()})
    return TrainResult(run_id, ckpt_dir / "model", metrics, step, version, info.model_uri)
