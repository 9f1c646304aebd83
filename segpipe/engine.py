"""train_one_epoch and evaluate: the two loops, nothing else."""
from __future__ import annotations

import contextlib
import itertools
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from segpipe.distributed import Runtime
from segpipe.metrics import ConfusionMatrix
from segpipe.models import resize_logits


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the step that did it is not applied."""


@dataclass
class TrainState:
    """Counters saved in checkpoints: epoch in progress, optimizer steps done, samples of this epoch trained.

    samples_done counts over all ranks (the global position in the epoch's shuffled order), so a run can
    resume on a different number of processes.
    """

    epoch: int = 0
    step: int = 0
    samples_done: int = 0


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
                    log: Callable[[dict, int], None] = lambda scalars, step: None, log_every: int = 20,
                    device_augment: Optional[Callable] = None, after_step: Callable[[], None] = lambda: None,
                    seed: int = 0) -> bool:
    """One pass over loader (the rest of it, after a resume), or until max_steps or a stop request.

    Returns True when some rank asked to stop (every rank gets the same answer). Micro-batches that cannot
    fill a last accumulation are left out, as drop_last does for images. One all_reduce per optimizer step
    (non-finite loss on any rank, stop requested on any rank) is all the synchronisation outside DDP's own;
    the loss is read on the host only at logging steps (log(scalars, step) gets the interval's mean).
    after_step() runs after each optimizer step.
    device_augment(images, params): with data.augment_on=device, batches are (uint8 images, masks, pixel
    parameters) and this does the pixel work (transforms.PixelOps) on the device; the parameters stay on the CPU.
    """
    model.train()
    usable = len(loader) // accum_steps * accum_steps
    bar = progress(itertools.islice(loader, usable), usable, f"epoch {state.epoch}", rt.is_main, log_every)
    nonfinite = torch.zeros((), device=rt.device)
    loss_sum, losses = torch.zeros((), device=rt.device), 0
    tic = time.perf_counter()
    for micro, (images, masks, *pixel_params) in enumerate(bar):
        data_time = time.perf_counter() - tic
        if micro % accum_steps == 0:
            # Model randomness (dropout) differs across ranks and depends only on the step: resume is exact.
            torch.manual_seed(model_seed(seed, rt.rank, state.step))
        if device_augment is not None:
            images = device_augment(images.to(rt.device, non_blocking=rt.pin_memory), pixel_params[0])
        images, masks = rt.to_device(images), masks.to(rt.device, non_blocking=rt.pin_memory).long()
        last_micro = (micro + 1) % accum_steps == 0
        # DDP syncs gradients only on the micro-batch that ends an accumulation.
        with model.no_sync() if hasattr(model, "no_sync") and not last_micro else contextlib.nullcontext():
            with rt.autocast():
                loss = criterion(model(images), masks)
            scaler.scale(loss / accum_steps).backward()
        loss = loss.detach()
        nonfinite = torch.maximum(nonfinite, (~torch.isfinite(loss)).float())  # on the device: no host sync
        loss_sum, losses = loss_sum + loss, losses + 1
        if not last_micro:
            continue
        # The one collective of the step, before scaler.step so that a bad step is never applied.
        bad, stop = reduce_flags(nonfinite, stop_requested(), rt)
        if bad:
            raise NonFiniteLossError(
                f"loss is {loss_sum.item() / losses if not torch.isfinite(loss_sum) else 'not finite on another rank'}"
                f" at step {state.step} (epoch {state.epoch}), lr {optimizer.param_groups[0]['lr']:.3g}; the last "
                f"good checkpoint is kept. Try a lower train.lr, train.grad_clip=1.0, or train.amp=none")
        if grad_clip is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state.step += 1
        state.samples_done += images.shape[0] * rt.world_size * accum_steps
        if state.step % log_every == 0 and rt.is_main:
            mean_loss = loss_sum.item() / losses  # the interval's mean: the only host read of the loss
            step_time = time.perf_counter() - tic
            log({"train/loss": mean_loss, "train/lr": optimizer.param_groups[0]["lr"],
                 "train/images_per_s": images.shape[0] * rt.world_size / step_time, "train/data_wait_s": data_time},
                state.step)
            bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}", refresh=False)
        if state.step % log_every == 0:
            loss_sum, losses = torch.zeros((), device=rt.device), 0
        after_step()
        if stop or (max_steps is not None and state.step >= max_steps):
            return stop
        tic = time.perf_counter()
    return False


def model_seed(seed: int, rank: int, step: int) -> int:
    """The seed of model randomness (dropout) at an optimizer step: different on each rank, the same on resume."""
    return ((seed * 1_000_003 + rank) * 10_000_019 + step) % (2 ** 63)


def reduce_flags(nonfinite: torch.Tensor, stop: bool, rt: Runtime) -> tuple[bool, bool]:
    """(any rank saw a non-finite loss, any rank was asked to stop): one all_reduce and one host read."""
    flags = torch.stack([nonfinite, nonfinite.new_full((), float(stop))])  # a fill on the device, not a copy
    if rt.world_size > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    bad, stop = flags.tolist()
    return bool(bad), bool(stop)


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

