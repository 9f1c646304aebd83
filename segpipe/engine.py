"""train_one_epoch and evaluate: the two loops, nothing else."""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from tqdm import tqdm

from segpipe.distributed import Runtime, all_reduce_max
from segpipe.metrics import ConfusionMatrix
from segpipe.models import resize_logits


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the step that did it is not applied."""


@dataclass
class TrainState:
    """Counters saved in checkpoints: epoch in progress, optimizer steps done, batches done this epoch."""

    epoch: int = 0
    step: int = 0
    batches_done: int = 0


class PlainProgress:
    """Periodic one-line progress reports, for logs and CI where a redrawn bar would be noise."""

    def __init__(self, iterable, total: int, desc: str, every: int):
        self.iterable, self.total, self.desc, self.every, self.postfix = iterable, total, desc, every, {}

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = values

    def __iter__(self):
        start = time.perf_counter()
        for n, item in enumerate(self.iterable, 1):
            yield item
            if n % self.every == 0 or n == self.total:
                extra = " ".join(f"{k}={v}" for k, v in self.postfix.items())
                print(f"{self.desc} {n}/{self.total} {time.perf_counter() - start:.1f}s {extra}", flush=True)


def progress(iterable, total: int, desc: str, enabled: bool, log_every: int):
    """A tqdm bar on a terminal; plain periodic lines when stdout is not one (CI, log files); nothing off rank 0."""
    if not enabled:
        return iterable
    if sys.stdout.isatty():
        return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True)
    return PlainProgress(iterable, total, desc, log_every)


def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer, scheduler, scaler, loader, rt: Runtime,
                    state: TrainState, accum_steps: int = 1, grad_clip: Optional[float] = None,
                    max_steps: Optional[int] = None, stop_requested: Callable[[], bool] = lambda: False,
                    log: Callable[[dict], None] = lambda scalars: None, log_every: int = 20,
                    device_augment: Optional[Callable] = None) -> None:
    """One pass over loader (the rest of it, after a resume), or until max_steps or a stop request.

    device_augment(images, sigmas): with data.augment_on=device, batches are (uint8 images, masks, blur sigmas)
    and this blurs and normalises them on the device.
    """
    model.train()
    bar = progress(loader, len(loader), f"epoch {state.epoch}", rt.is_main, log_every)
    tic = time.perf_counter()
    for images, masks, *sigmas in bar:
        data_time = time.perf_counter() - tic
        if device_augment is not None:
            to = dict(device=rt.device, non_blocking=rt.pin_memory)
            images = device_augment(images.to(**to), sigmas[0].to(**to))
        images, masks = rt.to_device(images), masks.to(rt.device, non_blocking=rt.pin_memory).long()
        last_micro = (state.batches_done + 1) % accum_steps == 0
        # DDP syncs gradients only on the micro-batch that ends an accumulation.
        with model.no_sync() if hasattr(model, "no_sync") and not last_micro else contextlib.nullcontext():
            with rt.autocast():
                loss = criterion(model(images), masks)
            nonfinite, = all_reduce_max([float(not torch.isfinite(loss).item())], rt.device)
            if nonfinite:
                raise NonFiniteLossError(
                    f"loss is {loss.item()} at step {state.step} (epoch {state.epoch}), lr "
                    f"{optimizer.param_groups[0]['lr']:.3g}; the last good checkpoint is kept. Try a lower "
                    f"train.lr, train.grad_clip=1.0, or train.amp=none")
            scaler.scale(loss / accum_steps).backward()
        state.batches_done += 1
        if not last_micro:
            continue
        if grad_clip is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state.step += 1
        step_time = time.perf_counter() - tic
        if state.step % log_every == 0 and rt.is_main:
            log({"train/loss": loss.item(), "train/lr": optimizer.param_groups[0]["lr"],
                 "train/images_per_s": images.shape[0] * rt.world_size / step_time, "train/data_wait_s": data_time})
        if rt.is_main:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}", refresh=False)
        stop, = all_reduce_max([float(stop_requested())], rt.device)
        if stop or (max_steps is not None and state.step >= max_steps):
            return
        tic = time.perf_counter()


@torch.inference_mode()
def evaluate(model: nn.Module, loader, num_classes: int, ignore_index: int, rt: Runtime,
             keep: int = 0) -> tuple[ConfusionMatrix, list]:
    """Confusion matrix over loader, summed over ranks, scored at each mask's own resolution.

    keep: how many (image, truth, prediction) triples of this rank to return for pictures.
    """
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index, device=rt.device)
    kept = []
    for images, masks in progress(loader, len(loader), "validate", rt.is_main, 20):
        with rt.autocast():
            logits = model(rt.to_device(images))["out"]
        for i, mask in enumerate(masks):
            mask = mask.to(rt.device)
            pred = resize_logits(logits[i:i + 1], tuple(mask.shape[-2:])).argmax(1)[0]
            cm.update(mask, pred)
            if len(kept) < keep:
                kept.append((images[i], mask.cpu(), pred.cpu()))
    cm.all_reduce()
    return cm, kept

