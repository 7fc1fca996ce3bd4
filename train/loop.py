"""``fine_tune``: automl's training recipe for a PyTorch EfficientDet, resumable, under torchrun.

One step (automl ``tf2/train_lib.py::EfficientDetNetTrain.train_step`` @ 6a54c87): forward in
train mode (BN batch statistics, momentum 0.01 / eps 1e-3; drop-connect at ``survival_prob``),
detection loss + L2 of the trained kernels, backward, per-process gradient clipping, sum of the
processes' gradients (automl's MirroredStrategy sums replicas), Keras-style SGD with momentum at
the step's warm-up + cosine learning rate, EMA update. Mixed precision (float16 autocast with a
dynamic loss scale) on CUDA only; the loss is always computed in float32 as automl casts the
outputs back before its loss.

Files in ``out_dir``: ``checkpoint.pt`` (model, optimizer, EMA, loss scale, epoch, history; the
run resumes from it) and ``model.pth`` (the EMA weights, or the raw ones without EMA, in the
format ``convert`` writes, loadable with ``EfficientDet.from_pretrained``). Both are rewritten
atomically at the end of every epoch by process 0. The per-epoch COCO AP is of that model, as
automl's evaluation restores the EMA (its TF2 Keras callback alone evaluates the raw weights).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from model import EfficientDet
from model.anchor_labeler import box_per_level, cls_per_level
from model.config import get_config
from model.loss import LossValues, detection_loss
from model.weights_io import atomic_path, save_weights
from verify.coco.errors import CocoEvalError

from . import distributed
from .config import TrainConfig
from .data import CocoTrainSet, read_records
from .ema import ModelEma
from .errors import TrainError, TrainInputError, TrainOutputError
from .evaluate import coco_ap
from .schedule import LrSchedule
from .step import KerasSGD, clip_gradients, l2_regularization, select_parameters

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
WEIGHTS_NAME = "model.pth"


@dataclass
class EpochRecord:
    epoch: int          # 1-based
    steps: int
    loss: float         # mean total (detection + L2) over the epoch's steps, process 0
    cls_loss: float
    box_loss: float
    ap: Optional[float] = None


@dataclass
class FineTuneResult:
    weights: Path
    checkpoint: Path
    history: list[EpochRecord] = field(default_factory=list)


def build_model(weights: Optional[Path], variant: Optional[str], num_classes: Optional[int],
                image_size: Any = None) -> EfficientDet:
    """Weights written by ``convert`` (class head replaced when ``num_classes`` differs), or a
    randomly initialised ``variant``."""
    overrides = {"image_size": image_size} if image_size else {}
    if weights is not None:
        try:
            model = EfficientDet.from_pretrained(weights, **overrides)
        except (OSError, ValueError, RuntimeError) as error:
            raise TrainInputError(f"cannot load weights {weights}: {error}") from None
        if num_classes and num_classes != model.config.num_classes:
            model.reset_head(num_classes)
        return model
    if variant is None:
        raise TrainInputError("give --weights or --variant")
    try:
        config = get_config(variant, **overrides,
                            **({"num_classes": num_classes} if num_classes else {}))
    except (KeyError, ValueError) as error:
        raise TrainInputError(str(error).strip("'\"")) from None
    return EfficientDet(config)


def train_step(model: EfficientDet, batch: tuple, trained: list[nn.Parameter],
                decayed: list[nn.Parameter], optimizer: KerasSGD, scaler: torch.amp.GradScaler,
                config: TrainConfig, use_amp: bool) -> tuple[LossValues, torch.Tensor, bool]:
    images, cls_targets, box_targets, num_positives = (t.to(model.anchors.boxes_yxyx.device)
                                                        for t in batch)
    det_config = model.config
    autocast = torch.autocast("cuda", dtype=torch.float16) if use_amp else contextlib.nullcontext()
    with autocast:
        class_outputs, box_outputs = model(images)
    values = detection_loss([c.float() for c in class_outputs], [b.float() for b in box_outputs],
                            cls_per_level(cls_targets, det_config),
                            box_per_level(box_targets, det_config), num_positives,
                            config.loss_config(), model.anchors.boxes_yxyx)
    reg = l2_regularization(decayed, config.weight_decay)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(values.total + reg).backward()
    scaler.unscale_(optimizer)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trained]
    if config.clip_gradients_norm > 0:
        grads = clip_gradients(grads, abs(config.clip_gradients_norm))
    grads = distributed.sum_gradients(grads)
    finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
    for param, grad in zip(trained, grads):
        param.grad = grad
    if finite:
        optimizer.step()
    scaler.update()
    return values, reg, finite


def _check_resume(state: dict, det_config: dict, train_config: TrainConfig, path: Path) -> None:
    if state.get("det_config") != det_config:
        raise TrainOutputError(f"{path} belongs to another model config; use a new --out folder")
    if state.get("train_config") != train_config.to_dict():
        changed = sorted(k for k, v in train_config.to_dict().items()
                         if state.get("train_config", {}).get(k) != v)
        raise TrainOutputError(f"{path} was written with other training settings "
                               f"({', '.join(changed)}); use a new --out folder")


def fine_tune(train_annotations: Path, train_images: Path, out_dir: Path, *,
              weights: Optional[Path] = None, variant: Optional[str] = None,
              num_classes: Optional[int] = None, image_size: Any = None,
              config: TrainConfig = TrainConfig(), val_annotations: Optional[Path] = None,
              val_images: Optional[Path] = None, device: Optional[str] = None, seed: int = 0,
              num_workers: int = 0, mixed_precision: bool = False, log_every: int = 10,
              stop_after_epochs: Optional[int] = None) -> FineTuneResult:
    """Fine-tunes on COCO-format data as automl's ``tf2/train.py`` trains (see module docstring).

    ``config.batch_size`` is the global batch: each of the ``torchrun`` processes takes
    ``batch_size / world_size`` images per step. Resumes from ``out_dir/checkpoint.pt`` when it
    exists and was written with the same model and training config. ``stop_after_epochs`` ends
    this invocation after that many epochs (a later call resumes), e.g. for time-limited jobs.
    """
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        raise TrainOutputError(f"folder {out_dir.parent} does not exist")
    ctx = distributed.setup(device)
    try:
        return _fine_tune(ctx, Path(train_annotations), Path(train_images), out_dir, weights,
                          variant, num_classes, image_size, config, val_annotations, val_images,
                          seed, num_workers, mixed_precision, log_every, stop_after_epochs)
    finally:
        distributed.teardown()


def _fine_tune(ctx: distributed.DistContext, train_annotations: Path, train_images: Path,
               out_dir: Path, weights, variant, num_classes, image_size, config: TrainConfig,
               val_annotations, val_images, seed: int, num_workers: int, mixed_precision: bool,
               log_every: int, stop_after_epochs: Optional[int]) -> FineTuneResult:
    torch.manual_seed(seed)
    model = build_model(weights, variant, num_classes, image_size)
    if config.batch_size % ctx.world_size:
        raise TrainError(f"batch_size {config.batch_size} is not divisible by the "
                         f"{ctx.world_size} processes")
    try:
        records = read_records(train_annotations, train_images, model.config.num_classes,
                               config.skip_crowd_during_training)
    except CocoEvalError as error:
        raise TrainInputError(str(error)) from None
    if ctx.world_size > 1 and ctx.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)   # automl 'gpus': SyncBatchNorm
    model.to(ctx.device).train()
    trained_named, decayed_named = select_parameters(model, config.var_freeze_expr)
    trained = [p for _, p in trained_named]
    decayed = [p for _, p in decayed_named]

    dataset = CocoTrainSet(records, model.config, config, seed)
    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank,
                                 shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=config.batch_size // ctx.world_size, sampler=sampler,
                        num_workers=num_workers, drop_last=True)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise TrainInputError(f"{len(records)} images make no full batch of {config.batch_size}")
    schedule = LrSchedule.from_config(config, steps_per_epoch)
    optimizer = KerasSGD(trained, lr=schedule(0), momentum=config.momentum)
    use_amp = mixed_precision and ctx.device.type == "cuda"
    if mixed_precision and not use_amp:
        logger.warning("mixed precision needs CUDA; training in float32")
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    ema = ModelEma(model, config.moving_average_decay, {n for n, _ in trained_named}) \
        if config.moving_average_decay else None

    checkpoint = out_dir / CHECKPOINT_NAME
    det_config = model.config.to_dict()
    start_epoch, step, history = 0, 0, []
    if checkpoint.is_file():
        try:
            state = torch.load(checkpoint, map_location=ctx.device, weights_only=False)
        except Exception as error:  # torch raises many types for a damaged file
            raise TrainInputError(f"cannot read checkpoint {checkpoint}: {error}") from None
        _check_resume(state, det_config, config, checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, step = state["epoch"], state["step"]
        torch.set_rng_state(state["rng"])   # drop-connect masks continue as without a break
        history = [EpochRecord(**record) for record in state["history"]]
        if ctx.is_main:
            logger.info("resuming from %s at epoch %d (step %d)", checkpoint, start_epoch + 1, step)
    out_dir.mkdir(exist_ok=True)

    num_epochs = math.ceil(config.num_epochs)
    last_epoch = num_epochs if stop_after_epochs is None else \
        min(num_epochs, start_epoch + stop_after_epochs)
    for epoch in range(start_epoch, last_epoch):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        sums = torch.zeros(3)
        started = time.perf_counter()
        for index, batch in enumerate(loader):
            for group in optimizer.param_groups:
                group["lr"] = schedule(step)
            values, reg, finite = train_step(model, batch, trained, decayed, optimizer, scaler,
                                              config, use_amp)
            if finite and ema is not None:
                ema.update(model)
            step += 1
            sums += torch.tensor([(values.total + reg).item(), values.cls.item(), values.box.item()])
            if ctx.is_main and ((index + 1) % log_every == 0 or index + 1 == steps_per_epoch):
                logger.info("epoch %d/%d step %d/%d lr %.5f loss %.4f (cls %.4f box %.5f "
                            "l2 %.4f)%s", epoch + 1, num_epochs, index + 1, steps_per_epoch,
                            schedule(step - 1), (values.total + reg).item(), values.cls.item(),
                            values.box.item(), reg.item(), "" if finite else " skipped: inf")
        mean = (sums / steps_per_epoch).tolist()
        record = EpochRecord(epoch + 1, steps_per_epoch, *mean)
        final_model = ema.module if ema is not None else model
        if ctx.is_main:
            if val_annotations is not None and ((epoch + 1) % config.map_freq == 0
                                                or epoch + 1 == num_epochs):
                record.ap = coco_ap(final_model, Path(val_annotations),
                                    Path(val_images or train_images))
            history.append(record)
            _save(out_dir, model, optimizer, scaler, ema, epoch + 1, step, history, det_config,
                  config, final_model)
            logger.info("epoch %d done in %.1f s: loss %.4f%s", epoch + 1,
                        time.perf_counter() - started, record.loss,
                        "" if record.ap is None else f", COCO AP {record.ap:.4f}")
        distributed.barrier()
    return FineTuneResult(out_dir / WEIGHTS_NAME, checkpoint, history)


def _save(out_dir: Path, model: nn.Module, optimizer: KerasSGD, scaler, ema: Optional[ModelEma],
          epoch: int, step: int, history: list[EpochRecord], det_config: dict,
          config: TrainConfig, final_model: nn.Module) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
             "epoch": epoch, "step": step, "history": [dataclasses.asdict(h) for h in history],
             "det_config": det_config, "train_config": config.to_dict(),
             "rng": torch.get_rng_state()}
    with atomic_path(out_dir / CHECKPOINT_NAME) as tmp_name:
        torch.save(state, tmp_name)
    metadata = {"variant": final_model.config.name, "config": det_config,
                "source": {"fine_tuned": True, "epoch": epoch, "step": step,
                           "ema": ema is not None, "train_config": config.to_dict()}}
    save_weights(out_dir / WEIGHTS_NAME, final_model.state_dict(), metadata)
