"""One training run of a validated config: data, model, optimizer, resume, the loop, checkpoints.

`train(cfg)` is what `python train.py` and `torchrun ... train.py` run (and what fine-tuning after pruning calls).
train.batch_size is per process; the learning rate scales linearly with the global batch
(batch_size * world_size * accum_steps) relative to train.lr_reference_batch.
"""
import functools
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torchvision.transforms.v2.functional import pil_to_tensor
from torchvision.utils import make_grid

from segpipe import distributed as dist_utils
from segpipe import tracking
from segpipe.checkpoint import (FINISHED, CheckpointError, copy_checkpoint, load_resume_checkpoint, mark_finished,
                                restore_training, save_checkpoint)
from segpipe.checkpoint import make_checkpoint as build_checkpoint
from segpipe.config import Config, ConfigError, check_class_weights, load_config, to_dict
from segpipe.data import DataError, MaskDecoder, SegmentationDataset, class_pixel_stats, worker_message
from segpipe.discover import apply_discovery, clamp_crop
from segpipe.engine import NonFiniteLossError, TrainState, evaluate, train_one_epoch
from segpipe.losses import SegmentationLoss, median_frequency_weights
from segpipe.metrics import ConfusionMatrix
from segpipe.model_files import build_initial_model
from segpipe.models import ModelError, has_batchnorm_pooling, model_options, set_bn_momentum
from segpipe.outputs import OutputError, describe, lock_run_dir, prepare_dir
from segpipe.shards import is_descriptor, open_index
from segpipe.tracking import Tracker, config_params, open_trackers, require_packages
from segpipe.transforms import PixelOps, collate_eval, eval_transform, train_transform
from segpipe.visualize import colorize, confusion_matrix_image, default_palette


def train(cfg: Config) -> int:
    """Build, train, report: the whole run of a validated config, step by step. Returns the exit code."""
    stop = StopSignal()  # from the start: a signal during set-up must not kill the process before it can save
    rt = setup_runtime(cfg)
    log = print if rt.is_main else (lambda *a, **k: None)
    if rt.is_main:
        check_trackers(cfg)  # a missing optional package stops the run now, not after the data is indexed
    data = lock = None
    try:
        lock = claim_output_dir(cfg, rt)
        data = build_data(cfg, rt, log)
        model, compression = build_network(cfg, data.num_classes, rt, log)
        criterion = build_criterion(cfg, data, rt, log)
        optimizer, scheduler, scaler, schedule = build_optimizer(cfg, model, rt, data.train_sampler.steps())
        state, best_miou = resume(cfg, model, optimizer, scheduler, scaler, rt, schedule, log)
        ddp_model = wrap_ddp(model, rt)  # after resume: DDP starts every rank from rank 0's restored weights
        with start_logging(cfg, rt, schedule, state != TrainState(), log) as tracker:  # an exception ends it FAILED
            run = Run(cfg, rt, data, model, ddp_model, criterion, optimizer, scheduler, scaler, compression, tracker,
                      log)
            outcome = fit(run, state, best_miou, schedule, stop)
            if outcome.completed:
                finish(cfg, rt, outcome.best_miou, tracker, log)
            tracker.close(outcome.status)
        return outcome.exit_code
    finally:
        if data is not None:
            dist_utils.stop_loader_workers(data.train_loader, data.valid_loader)
        dist_utils.cleanup()
        stop.restore()
        if lock is not None:
            lock.close()


# -- configuration and processes -------------------------------------------------------------------------------

def read_config(path: str, overrides: list) -> Config:
    """The validated config; a bad key or value, or a missing data folder, ends the program with one line."""
    try:
        cfg = load_config(path, overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    if not cfg.data.synthetic and not is_descriptor(cfg.data.root) and not Path(cfg.data.root).is_dir():
        sys.exit(f"data.root={cfg.data.root} does not exist. Put your data in ROOT/train/NAME.jpg + NAME_mask.png "
                 f"(and ROOT/valid/...), then run `python train.py --config configs/default.yaml data.root=ROOT` "
                 f"(or data.root=OUT/shards.json after `python -m segpipe.shards write ROOT OUT`); "
                 f"or try the built-in demo: `python train.py --config configs/synthetic.yaml`")
    try:  # before anything slow: a run that cannot save its checkpoints should not start
        prepare_dir(cfg.output_dir, "output_dir")
    except OutputError as e:
        sys.exit(f"config error: {e}")
    return cfg


def check_trackers(cfg: Config) -> None:
    """Stop with one line when train.tracker names a tracker whose package is not installed."""
    try:
        require_packages(cfg.train.tracker)
    except ConfigError as e:
        sys.exit(f"config error: {e}")


def setup_runtime(cfg: Config) -> dist_utils.Runtime:
    """Join the process group and pick device and precision (every such choice is made in distributed.setup)."""
    try:
        rt = dist_utils.setup(cfg.train.device, cfg.train.backend, cfg.train.amp, cfg.model.channels_last,
                              timeout_s=cfg.train.dist_timeout_s, augment_on=cfg.data.augment_on)
    except ValueError as e:
        sys.exit(f"config error: {e}")
    torch.manual_seed(cfg.train.seed)
    return rt


def claim_output_dir(cfg: Config, rt: dist_utils.Runtime):
    """One training run per output_dir: rank 0 locks it until this run ends (a run resubmitted while the old one
    still writes there would overwrite its checkpoints); a second run stops at once, every rank with it."""
    lock, error = None, None
    if rt.is_main:
        try:
            lock = lock_run_dir(Path(cfg.output_dir))
        except OutputError as e:
            error = str(e)
    error = dist_utils.broadcast_object(error, rt)
    if error:
        sys.exit(f"error: {error}")
    return lock


# -- data ----------------------------------------------------------------------------------------------------------

@dataclass
class Data:
    """The loaders and what the rest of the run needs to know about the data."""

    train_loader: DataLoader
    valid_loader: DataLoader
    train_sampler: dist_utils.SeededSampler
    num_classes: int
    palette: list
    train_index: list
    decoder: MaskDecoder
    device_augment: Optional[Callable]


def build_data(cfg: Config, rt: dist_utils.Runtime, log: Callable) -> Data:
    """Index the folders, name the classes, and build the training and validation loaders."""
    try:
        # Local rank 0 prepares the folders first, so a node's other ranks read its cached index.
        if rt.local_rank != 0 and rt.world_size > 1:
            torch.distributed.barrier()
        if cfg.data.synthetic:
            from segpipe.synthetic import ensure_dataset
            ensure_dataset(cfg.data.root)  # written once, on first use
        # A folder's cached file index, or a shard descriptor's (segpipe.shards, remote shards cached on disk).
        train_index, valid_index = (open_index(cfg.data.root, split, cfg.data.cache_dir, cfg.data.skip_unpaired,
                                               cfg.data.cache_limit, cfg.data.shuffle_window)
                                    for split in ("train", "valid"))
        if rt.local_rank == 0 and rt.world_size > 1:
            torch.distributed.barrier()
        if cfg.data.classes is None:  # no class list yet: the same detection as `python -m segpipe.discover`
            log(apply_discovery(cfg.data, train_index))
        crop_note = clamp_crop(cfg.data, train_index)
        if crop_note:
            log(crop_note)
        num_classes = len(cfg.data.classes)
        check_class_weights(cfg.train.class_weights, num_classes)
        if cfg.data.palette:
            palette = [list(c) for c in cfg.data.palette]
        else:
            palette = [list(c) for c in default_palette(num_classes)]
        decoder = MaskDecoder(num_classes, cfg.data.ignore_index, cfg.data.mask_format, cfg.data.palette,
                              cfg.data.palette_ignore, cfg.data.label_map)
    except DataError as e:
        sys.exit(f"data error: {e}")
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    decode_size = tuple(cfg.data.train_size) if cfg.data.train_size else None
    train_set = SegmentationDataset(train_index, decoder, train_transform(cfg.data, rt.augment_on_device),
                                    decode_size)
    # With data.augment_on=device the workers send uint8 crops and their pixel parameters; the step does the rest.
    device_augment = None
    if rt.augment_on_device:
        device_augment = PixelOps.from_config(cfg.data)
    valid_set = SegmentationDataset(valid_index, decoder, eval_transform(cfg.data))
    # The epoch's order depends only on (seed, epoch), and positions count over all ranks: resume needs both.
    # Shards: the same contract, shuffling within windows of data.shuffle_window shards.
    train_sampler = dist_utils.train_sampler(train_index, rt.rank, rt.world_size, cfg.train.seed,
                                             cfg.train.batch_size * cfg.train.accum_steps, cfg.data.shuffle_window)
    # Workers ignore SIGTERM/SIGINT, which torchrun and SLURM send to the whole process group: the training
    # process must outlive them long enough to save last.pt.
    num_workers = dist_utils.resolve_num_workers(cfg.data.num_workers)
    loader_args = dict(num_workers=num_workers, pin_memory=rt.pin_memory, persistent_workers=num_workers > 0,
                       worker_init_fn=dist_utils.ignore_stop_signals)
    # drop_last: a last batch of 1 would break DeepLabV3's ASPP pooling BatchNorm and skew BN statistics.
    train_loader = DataLoader(train_set, cfg.train.batch_size, sampler=train_sampler, drop_last=True, **loader_args)
    valid_loader = DataLoader(valid_set, cfg.train.batch_size,
                              sampler=dist_utils.ShardSampler(len(valid_set), rt.rank, rt.world_size),
                              collate_fn=collate_eval, **loader_args)
    if train_sampler.steps() == 0:
        sys.exit(f"data error: {len(train_set)} training images cannot fill one step of train.batch_size="
                 f"{cfg.train.batch_size} x train.accum_steps={cfg.train.accum_steps} on each of {rt.world_size} "
                 f"process(es); lower train.batch_size or train.accum_steps")
    return Data(train_loader, valid_loader, train_sampler, num_classes, palette, train_index, decoder,
                device_augment)


# -- model, loss, optimizer ------------------------------------------------------------------------------------------

def build_network(cfg: Config, num_classes: int, rt: dist_utils.Runtime, log: Callable) -> tuple:
    """The model on its device (from the registry, or a pruned train.init_from) and its compression record, if any."""
    try:
        model, compression = build_initial_model(cfg.model, num_classes, cfg.train.init_from)
    except (ModelError, CheckpointError) as e:
        sys.exit(f"model error: {e}")
    set_bn_momentum(model, cfg.model.bn_momentum)
    if has_batchnorm_pooling(model) and cfg.train.batch_size < 2:
        sys.exit(f"{cfg.model.name} has a BatchNorm after global pooling (ASPP) that cannot train on one image per "
                 f"process: set train.batch_size=2 or more")
    if rt.world_size > 1 and cfg.model.sync_bn:
        if rt.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log("note: SyncBatchNorm needs CUDA; on CPU each process keeps its own BatchNorm statistics")
    return model.to(rt.device, memory_format=rt.memory_format), compression


def build_criterion(cfg: Config, data: Data, rt: dist_utils.Runtime, log: Callable) -> torch.nn.Module:
    """The configured loss, with class weights if asked for."""
    class_weights = None
    if cfg.train.class_weights == "median_freq":
        try:
            class_weights = median_frequency_weights(*class_pixel_stats(data.train_index, data.decoder))
        except DataError as e:
            sys.exit(f"data error: {e}")
        log("median-frequency class weights: " + ", ".join(f"{c}={w:.2f}" for c, w in
                                                         zip(cfg.data.classes, class_weights.tolist())))
    elif cfg.train.class_weights is not None:
        class_weights = torch.tensor(cfg.train.class_weights, dtype=torch.float32)
    criterion = SegmentationLoss(cfg.train.loss, cfg.data.ignore_index, class_weights, cfg.model.aux_weight)
    return criterion.to(rt.device)


@dataclass
class Schedule:
    """The run's length and learning rate, as decided from the config and the world size."""

    global_batch: int
    lr: float
    steps_per_epoch: int
    total_steps: int  # the schedule's length
    max_steps: int  # where this run stops (train.max_steps stops early without changing the schedule)
    warmup: int
    poly_power: float

    def lr_factor(self, step: int) -> float:
        """Linear warm-up, then polynomial decay to zero at total_steps (per optimizer step)."""
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        return max(0.0, 1 - (step - self.warmup) / max(1, self.total_steps - self.warmup)) ** self.poly_power


def build_optimizer(cfg: Config, model: torch.nn.Module, rt: dist_utils.Runtime, steps_per_epoch: int) -> tuple:
    """Optimizer, LR schedule and gradient scaler, with the learning rate scaled to the global batch."""
    global_batch = cfg.train.batch_size * rt.world_size * cfg.train.accum_steps
    lr = cfg.train.lr * (global_batch / cfg.train.lr_reference_batch if cfg.train.lr_reference_batch else 1)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.train.optimizer == "sgd":  # config.OPTIMIZERS: the config was checked against it when it was read
        optimizer = torch.optim.SGD(params, lr=lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.train.weight_decay)
    total_steps = max(1, cfg.train.epochs * steps_per_epoch)  # the schedule's length; max_steps only stops early
    max_steps = min(total_steps, cfg.train.max_steps or total_steps)
    schedule = Schedule(global_batch, lr, steps_per_epoch, total_steps, max_steps,
                        min(cfg.train.warmup_steps, total_steps // 4), cfg.train.poly_power)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.lr_factor)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.use_grad_scaler)
    return optimizer, scheduler, scaler, schedule


# -- resume, wrap, log -----------------------------------------------------------------------------------------------

def resume(cfg: Config, model, optimizer, scheduler, scaler, rt: dist_utils.Runtime, schedule: "Schedule",
           log: Callable) -> tuple[TrainState, float]:
    """Restore model, optimizer, schedule and counters from train.resume (auto: OUTPUT_DIR/last.pt if present).

    A checkpoint from another global batch (other world size, batch size or accumulation) continues from the
    same sample position with the learning rate and step count of the new global batch.
    """
    found = resume_checkpoint(cfg, rt)
    if found is None:
        return TrainState(), -1.0
    path, ckpt = found
    try:
        restore_training(ckpt, path, f"a {cfg.model.name} with {len(cfg.data.classes)} classes", model, optimizer,
                         scheduler)
    except CheckpointError as e:
        sys.exit(f"model error: {e}")
    restore_scaler(scaler, ckpt["scaler"], log)
    saved_world = ckpt.get("world_size", rt.world_size)
    saved_batch = ckpt.get("global_batch", schedule.global_batch)
    # Checkpoints written before samples_done counted batches per process.
    samples = ckpt.get("samples_done", ckpt.get("batches_done", 0) * cfg.train.batch_size * saved_world)
    state = TrainState(ckpt["epoch"], ckpt["step"], samples)
    log(f"resumed from {path}: epoch {state.epoch}, step {state.step}, sample {samples} of the epoch, "
        f"best mIoU {ckpt['best_miou']:.4f}")
    old_lr = optimizer.param_groups[0]["lr"]
    if saved_batch != schedule.global_batch:
        state.step = state.epoch * schedule.steps_per_epoch + samples // schedule.global_batch
    # This run's schedule from here on (its length may differ, e.g. more epochs): LambdaLR would apply it
    # only from the next step, and the restored base_lrs / initial_lr are the old run's.
    rescale_schedule(optimizer, scheduler, schedule, state.step)
    if saved_batch != schedule.global_batch:
        log(f"global batch changed from {saved_batch} ({saved_world} process(es)) to {schedule.global_batch} "
            f"({rt.world_size}): lr {old_lr:.4g} -> {optimizer.param_groups[0]['lr']:.4g} (base {schedule.lr:.4g}), "
            f"step {ckpt['step']} -> {state.step} of {schedule.total_steps}; the epoch goes on from sample {samples}")
    return state, ckpt["best_miou"]


def resume_checkpoint(cfg: Config, rt: dist_utils.Runtime) -> Optional[tuple[str, dict]]:
    """(path, checkpoint) to resume from, the same on every rank, or None; loaded on the CPU.

    Rank 0 decides (output folders need not be shared between nodes); a rank that cannot read the file gets
    rank 0's copy. A problem on any rank ends every rank with the same message.
    """
    decision = None
    if rt.is_main:
        decision = resume_decision(cfg.train.resume, Path(cfg.output_dir))
    decision = dist_utils.broadcast_object(decision, rt)
    if "error" in decision:
        sys.exit(f"resume error: {decision['error']}")
    path = decision["path"]
    if path is None:
        return None
    ckpt, error = None, None
    if Path(path).is_file():
        try:  # on the CPU: the optimizer's step counters must stay there (AdamW syncs every step otherwise)
            ckpt = load_resume_checkpoint(path)
        except CheckpointError as e:
            error = str(e)
    missing, failed = float(ckpt is None and error is None), float(error is not None)
    if rt.world_size > 1:
        missing, failed = dist_utils.all_reduce_max([missing, failed], rt.device)
    if failed:
        sys.exit(f"model error: {error}" if error else
                 f"model error: another rank cannot load {path}; see its message")
    if missing:  # this node (or another) has no copy of the file: everyone takes rank 0's
        ckpt = dist_utils.broadcast_object(ckpt, rt)
    return path, ckpt


def resume_decision(resume: Optional[str], out_dir: Path) -> dict:
    """What train.resume means here: {"path": file or None}, or {"error": message}."""
    if not resume:
        return {"path": None}
    if resume == "auto":
        last = out_dir / "last.pt"
        return {"path": str(last) if last.is_file() else None}
    if not Path(resume).is_file():
        return {"error": f"train.resume={resume} does not exist; pass a last.pt written by train.py, or "
                         f"train.resume=auto to continue from {out_dir / 'last.pt'} when there is one"}
    return {"path": resume}


def restore_scaler(scaler: torch.amp.GradScaler, saved: dict, log: Callable) -> None:
    """The gradient scaler's state, when both runs use one (fp16); a precision change starts it fresh."""
    if scaler.is_enabled() and saved:
        scaler.load_state_dict(saved)
    elif scaler.is_enabled() or saved:
        log("note: the checkpoint was trained with another precision (train.amp); "
            + ("the fp16 gradient scaler starts fresh" if scaler.is_enabled() else "its gradient scaler is unused"))


def rescale_schedule(optimizer, scheduler, schedule: "Schedule", step: int) -> None:
    """Put the restored optimizer and LambdaLR on this run's base learning rate, at this step of its schedule."""
    scheduler.base_lrs = [schedule.lr] * len(optimizer.param_groups)
    scheduler.last_epoch = step
    for group in optimizer.param_groups:
        group["initial_lr"] = schedule.lr
        group["lr"] = schedule.lr * schedule.lr_factor(step)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports


def wrap_ddp(model: torch.nn.Module, rt: dist_utils.Runtime) -> torch.nn.Module:
    """DistributedDataParallel around the model when there is more than one process."""
    if rt.world_size == 1:
        return model
    return DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)


def start_logging(cfg: Config, rt: dist_utils.Runtime, schedule: Schedule, resumed: bool, log: Callable) -> Tracker:
    """On rank 0: the output folder, the config next to the results, a summary line and the trackers of
    train.tracker (a resumed run continues its MLflow / W&B run); other ranks get a Tracker that does nothing."""
    if not rt.is_main:
        return Tracker()
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / FINISHED).unlink(missing_ok=True)  # training again: not finished until it ends
    (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    log(f"config (resolved): {out_dir / 'config.yaml'}")
    s = schedule
    log(f"{rt.world_size} process(es) on {rt.device}, amp={rt.amp_dtype}, channels_last={rt.channels_last}, "
        f"global batch {s.global_batch}, lr {s.lr:.4g}, {s.steps_per_epoch} steps/epoch, {s.total_steps} steps"
        + (f" (stopping after {s.max_steps})" if s.max_steps < s.total_steps else ""))
    try:
        return open_trackers(cfg.train.tracker, out_dir, cfg.train.experiment, config_params(to_dict(cfg)), resumed,
                             log)
    except ConfigError as e:
        sys.exit(f"config error: {e}")


# -- the loop ----------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """What fit needs: the built pieces of one training run (none of them change identity during it)."""

    cfg: Config
    rt: dist_utils.Runtime
    data: Data
    model: torch.nn.Module  # the bare model: saved, evaluated
    ddp_model: torch.nn.Module  # what trains (DDP-wrapped with more than one process)
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    compression: Optional[dict]
    tracker: Tracker  # does nothing on ranks other than 0
    log: Callable


class StopSignal:
    """Remembers SIGTERM and SIGINT (preemption, scancel, Ctrl-C; torchrun forwards both) so the loop can save."""

    def __init__(self):
        self.signum = None
        self.previous = {signum: signal.signal(signum, self.handle) for signum in (signal.SIGTERM, signal.SIGINT)}

    def restore(self) -> None:
        """Give the signals back to their earlier handlers (train() may run inside a longer program)."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame) -> None:
        self.signum = signum

    def __call__(self) -> bool:
        return self.signum is not None


class Outcome(NamedTuple):
    """How fit ended: the exit code, the best validation mIoU, and whether the schedule ran to its end."""

    exit_code: int
    best_miou: float
    completed: bool

    @property
    def status(self) -> str:
        """How the trackers record the end: FINISHED, FAILED, or KILLED (stopped by a signal, resumable)."""
        return tracking.FINISHED if self.completed else tracking.FAILED if self.exit_code else tracking.KILLED


def fit(run: Run, state: TrainState, best_miou: float, schedule: Schedule, stop: StopSignal) -> Outcome:
    """Train epoch by epoch, validate, save last.pt and best.pt; on a signal save and stop."""
    cfg, rt, log, out_dir = run.cfg, run.rt, run.log, Path(run.cfg.output_dir)
    try:
        while state.epoch < cfg.train.epochs and state.step < schedule.max_steps:
            epoch_start = time.time()
            run.data.train_sampler.set_epoch(state.epoch, start=state.samples_done)
            stopped = train_one_epoch(
                run.ddp_model, run.criterion, run.optimizer, run.scheduler, run.scaler, run.data.train_loader, rt,
                state, cfg.train.accum_steps, cfg.train.grad_clip, schedule.max_steps, stop,
                run.tracker.log_metrics, cfg.train.log_every, run.data.device_augment,
                functools.partial(save_periodically, run, state, best_miou), cfg.train.seed)
            if run.data.train_sampler.steps(state.samples_done) == 0:  # the epoch is complete
                state.epoch, state.samples_done = state.epoch + 1, 0
            # Every rank takes the same branch: the flag was reduced over ranks (here once per epoch).
            stopped = stopped or any_rank(stop(), rt)
            if stopped:  # preempted: save quickly and go; resume continues from the next sample
                if rt.is_main:
                    save_checkpoint(make_checkpoint(run, state, best_miou, -1.0), out_dir / "last.pt")
                log(f"stopped by signal at step {state.step}; saved {out_dir / 'last.pt'}, "
                    f"resume with train.resume=auto")
                return Outcome(0, best_miou, completed=False)
            miou, cm = -1.0, None
            if (state.epoch % cfg.train.val_every == 0 or state.epoch == cfg.train.epochs
                    or state.step >= schedule.max_steps):
                miou, cm = validate(run, state)
            if rt.is_main:
                save_checkpoint(make_checkpoint(run, state, best_miou, miou), out_dir / "last.pt")
                if miou > best_miou:  # last.pt already records it as the best: best.pt is that file
                    best_miou = miou
                    copy_checkpoint(out_dir / "last.pt", out_dir / "best.pt")
                    save_confusion_matrix(cm, cfg.data.classes, state, miou, out_dir / "best_confusion_matrix")
                scores = (f"val mIoU {miou:.4f} (best {best_miou:.4f})" if miou >= 0 else
                          f"not validated (train.val_every={cfg.train.val_every})")
                log(f"epoch {state.epoch}: step {state.step}, {scores}, {time.time() - epoch_start:.1f} s")
    except NonFiniteLossError as e:
        log(f"error: {e}")
        return Outcome(1, best_miou, completed=False)
    except DataError as e:
        dist_utils.report_failure(f"data error on rank {run.rt.rank}: {worker_message(e)}")
        return Outcome(1, best_miou, completed=False)
    except CheckpointError as e:  # a full disk or a vanished output_dir while saving
        print(f"error: {e}", file=sys.stderr)
        return Outcome(1, best_miou, completed=False)
    return Outcome(0, best_miou, completed=True)


def any_rank(flag: bool, rt: dist_utils.Runtime) -> bool:
    """True on every rank when flag is True on some rank."""
    return bool(dist_utils.all_reduce_max([float(flag)], rt.device)[0])


def save_periodically(run: Run, state: TrainState, best_miou: float) -> None:
    """last.pt every train.save_every optimizer steps (rank 0), so a killed job loses at most that many steps."""
    every = run.cfg.train.save_every
    if every and state.step % every == 0 and run.rt.is_main:
        save_checkpoint(make_checkpoint(run, state, best_miou, -1.0), Path(run.cfg.output_dir) / "last.pt")


def validate(run: Run, state: TrainState) -> tuple[float, ConfusionMatrix]:
    """mIoU and confusion matrix on the validation set (every image once over all ranks); scores and pictures
    go to the trackers."""
    cfg = run.cfg
    cm, kept = evaluate(run.model, run.data.valid_loader, run.data.num_classes, cfg.data.ignore_index, run.rt,
                        keep=cfg.train.num_vis if run.rt.is_main else 0)
    metrics = cm.compute()
    scalars = {"val/miou": metrics["miou"], "val/pixel_accuracy": metrics["pixel_accuracy"]}
    # NaN: class absent from truth and prediction, left out.
    scalars.update({f"val_iou/{name}": iou for name, iou in zip(cfg.data.classes, metrics["iou"]) if iou == iou})
    run.tracker.log_metrics(scalars, state.step)
    for i, (image, truth, pred) in enumerate(kept):
        panel = validation_panel(image, truth, pred, cfg.data.mean, cfg.data.std, run.data.palette,
                                 cfg.data.ignore_index)
        run.tracker.log_image(f"val/sample_{i}", panel, state.step)
    return metrics["miou"], cm


def save_confusion_matrix(cm: ConfusionMatrix, classes: list, state: TrainState, miou: float, stem: Path) -> None:
    """STEM.json (pixel counts, rows truth, columns prediction) and STEM.png (row-normalised), written atomically."""
    record = {"classes": list(classes), "epoch": state.epoch, "step": state.step, "miou": miou,
              "matrix": cm.matrix.cpu().tolist()}
    json_tmp, png_tmp = stem.with_name(f".{stem.name}.json.tmp"), stem.with_name(f".{stem.name}.png.tmp")
    try:
        json_tmp.write_text(json.dumps(record) + "\n")
        confusion_matrix_image(cm.matrix.cpu().numpy(), classes).save(png_tmp, format="PNG")
        os.replace(json_tmp, stem.with_suffix(".json"))
        os.replace(png_tmp, stem.with_suffix(".png"))
    except OSError as e:
        raise CheckpointError(f"cannot write {stem}.json/.png ({describe(e)}); free space in output_dir or "
                              f"choose another output_dir") from None


def validation_panel(image: torch.Tensor, truth: torch.Tensor, pred: torch.Tensor, mean: list, std: list,
                     palette: list, ignore_index: int) -> torch.Tensor:
    """image | truth | prediction side by side (uint8 CHW), at the mask's resolution, for the trackers."""
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    rgb = ((image.float().cpu() * std + mean).clamp(0, 1) * 255).to(torch.uint8)
    rgb = torch.nn.functional.interpolate(rgb[None].float(), size=truth.shape[-2:], mode="bilinear")[0]
    # visualize.colorize is the one colouring of class maps (ignored pixels black), as in infer.py's pictures.
    truth_rgb, pred_rgb = (pil_to_tensor(colorize(m.cpu().numpy(), palette, ignore_index).convert("RGB"))
                           for m in (truth, pred))
    return make_grid([rgb.to(torch.uint8), truth_rgb, pred_rgb], nrow=3, padding=0)


def finish(cfg: Config, rt: dist_utils.Runtime, best_miou: float, tracker: Tracker, log: Callable) -> None:
    """Mark the run finished (infer.py and evaluate.py pick only finished runs), give the trackers the best
    checkpoint, its confusion matrix and the config, and say what to run next."""
    if not rt.is_main:
        return
    out_dir = Path(cfg.output_dir)
    mark_finished(out_dir, cfg.data.classes, best_miou)
    for name in ("best.pt", "best_confusion_matrix.json", "best_confusion_matrix.png", "config.yaml"):
        if (out_dir / name).is_file():  # no best.pt when no validation scored (mIoU NaN)
            tracker.log_artifact(out_dir / name)
    log(f"done: best validation mIoU {best_miou:.4f}, {out_dir / 'best.pt'}\n"
        f"next: python evaluate.py {out_dir / 'best.pt'}\n"
        f"      python infer.py IMAGES --checkpoint {out_dir / 'best.pt'}")


def make_checkpoint(run: Run, state: TrainState, best_miou: float, miou: float) -> dict:
    """This run's checkpoint (segpipe.checkpoint's format): resumable, and enough to predict without the config."""
    cfg = run.cfg
    meta = {"model_name": cfg.model.name, "model_options": model_options(cfg.model),
            "num_classes": run.data.num_classes, "classes": list(cfg.data.classes), "palette": run.data.palette,
            "ignore_index": cfg.data.ignore_index, "mean": cfg.data.mean, "std": cfg.data.std,
            "eval_size": cfg.data.eval_size, "config": to_dict(cfg)}
    training = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                "scaler": run.scaler.state_dict(), "epoch": state.epoch, "step": state.step,
                "samples_done": state.samples_done, "world_size": run.rt.world_size,
                "global_batch": cfg.train.batch_size * run.rt.world_size * cfg.train.accum_steps,
                "best_miou": max(best_miou, miou), "miou": miou}
    return build_checkpoint(run.model.state_dict(), meta, training, run.compression)
