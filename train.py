"""Train a segmentation model: `python train.py --config configs/camvid.yaml [section.key=value ...]`.

Multi-GPU / multi-node: `torchrun --nproc_per_node=N train.py --config ...` (one process per device).
train.batch_size is per process; the learning rate scales linearly with the global batch
(batch_size * world_size * accum_steps) relative to train.lr_reference_batch.
"""
import argparse
import signal
import sys
import time
from pathlib import Path

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.tensorboard import SummaryWriter

from segpipe import distributed as dist_utils
from segpipe.checkpoint import (FINISHED, FORMAT, CheckpointError, load_checkpoint, mark_finished, save_checkpoint,
                                versions)
from segpipe.compress import is_artefact, model_from_checkpoint
from segpipe.compress.int8 import SUFFIX as INT8_SUFFIX
from segpipe.config import ConfigError, load_config, to_dict
from segpipe.data import DataError, MaskDecoder, SegmentationDataset, class_pixel_stats, load_index
from segpipe.discover import apply_discovery, clamp_crop
from segpipe.engine import NonFiniteLossError, TrainState, evaluate, train_one_epoch
from segpipe.losses import SegmentationLoss, median_frequency_weights
from segpipe.models import (ModelError, build_model, has_batchnorm_pooling, load_pretrained, model_options,
                            set_bn_momentum)
from segpipe.transforms import BlurNormalizeBatch, collate_eval, eval_transform, train_transform

# A DataLoader worker started with spawn or forkserver (macOS, Windows, Python >= 3.14) imports this file
# again as __mp_main__: everything below runs only when the file is the program.
if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml", help="YAML file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=2 data.root=/data/x")
    args = parser.parse_args()

    # -- configuration ------------------------------------------------------------------------------------
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    if not cfg.data.synthetic and not Path(cfg.data.root).is_dir():
        sys.exit(f"data.root={cfg.data.root} does not exist. Put your data in ROOT/train/NAME.jpg + NAME_mask.png "
                 f"(and ROOT/valid/...), then run `python train.py --config configs/default.yaml data.root=ROOT`; "
                 f"or try the built-in demo: `python train.py --config configs/synthetic.yaml`")

    # -- processes and devices (every device/precision choice is made in distributed.setup) ----------------
    try:
        rt = dist_utils.setup(cfg.train.device, cfg.train.backend, cfg.train.amp, cfg.model.channels_last,
                              augment_on=cfg.data.augment_on, color_jitter=cfg.data.color_jitter)
    except ValueError as e:
        sys.exit(f"config error: {e}")
    torch.manual_seed(cfg.train.seed)
    out_dir = Path(cfg.output_dir)
    log = print if rt.is_main else (lambda *a, **k: None)

    # -- data ---------------------------------------------------------------------------------------------
    try:
        # Local rank 0 prepares the folders first, so a node's other ranks read its cached index.
        if rt.local_rank != 0 and rt.world_size > 1:
            torch.distributed.barrier()
        if cfg.data.synthetic:
            from segpipe.synthetic import ensure_dataset
            ensure_dataset(cfg.data.root)  # written once, on first use
        train_index = load_index(cfg.data.root, "train", cfg.data.cache_dir, cfg.data.skip_unpaired)
        valid_index = load_index(cfg.data.root, "valid", cfg.data.cache_dir, cfg.data.skip_unpaired)
        if rt.local_rank == 0 and rt.world_size > 1:
            torch.distributed.barrier()
        if cfg.data.classes is None:  # no class list yet: the same detection as `python -m segpipe.discover`
            log(apply_discovery(cfg.data, train_index))
        crop_note = clamp_crop(cfg.data, train_index)
        if crop_note:
            log(crop_note)
        num_classes = len(cfg.data.classes)
        if cfg.data.palette:
            palette = [list(c) for c in cfg.data.palette]
        else:
            from segpipe.visualize import default_palette
            palette = [list(c) for c in default_palette(num_classes)]
        decoder = MaskDecoder(num_classes, cfg.data.ignore_index, cfg.data.mask_format, cfg.data.palette,
                              cfg.data.palette_ignore, cfg.data.label_map)
    except DataError as e:
        sys.exit(f"data error: {e}")
    decode_size = tuple(cfg.data.train_size) if cfg.data.train_size else None
    train_set = SegmentationDataset(train_index, decoder, train_transform(cfg.data, rt.augment_on_device),
                                    decode_size)
    # With data.augment_on=device the workers send uint8 crops and blur draws; the training step does the rest.
    device_augment = None
    if rt.augment_on_device:
        device_augment = BlurNormalizeBatch(cfg.data.mean, cfg.data.std, cfg.data.blur_kernel)
    valid_set = SegmentationDataset(valid_index, decoder, eval_transform(cfg.data))
    # DistributedSampler in a world of one too: its shuffle depends only on (seed, epoch), which resume needs.
    base_sampler = DistributedSampler(train_set, rt.world_size, rt.rank, shuffle=True, seed=cfg.train.seed,
                                      drop_last=True)
    train_sampler = dist_utils.SeededSampler(base_sampler, cfg.train.seed)
    num_workers = dist_utils.resolve_num_workers(cfg.data.num_workers)
    loader_args = dict(num_workers=num_workers, pin_memory=rt.pin_memory, persistent_workers=num_workers > 0)
    # drop_last: a last batch of 1 would break DeepLabV3's ASPP pooling BatchNorm and skew BN statistics.
    train_loader = DataLoader(train_set, cfg.train.batch_size, sampler=train_sampler, drop_last=True, **loader_args)
    valid_loader = DataLoader(valid_set, cfg.train.batch_size,
                              sampler=dist_utils.ShardSampler(len(valid_set), rt.rank, rt.world_size),
                              collate_fn=collate_eval, **loader_args)
    if len(train_loader) == 0:
        sys.exit(f"data error: {len(train_set)} training images cannot fill one batch of train.batch_size="
                 f"{cfg.train.batch_size} on each of {rt.world_size} process(es); lower train.batch_size")

    # -- model ---------------------------------------------------------------------------------------------
    compression = None
    try:
        if cfg.train.init_from and is_artefact(cfg.train.init_from):  # pruned: its widths are not the registry's
            if cfg.train.init_from.endswith(INT8_SUFFIX):
                sys.exit(f"train.init_from={cfg.train.init_from} is an int8 artefact, which cannot be trained; "
                         f"fine-tune the float or pruned checkpoint it was made from, then quantize again")
            source = load_checkpoint(cfg.train.init_from)
            if (source["model_name"], source["num_classes"]) != (cfg.model.name, num_classes):
                sys.exit(f"train.init_from={cfg.train.init_from} is a {source['model_name']} with "
                         f"{source['num_classes']} classes, but the config trains a {cfg.model.name} with "
                         f"{num_classes}; set model.name and data.classes to match it")
            model = model_from_checkpoint(source)
            compression = source["compression"]  # kept in this run's checkpoints: their widths are the pruned ones
        else:
            model = build_model(cfg.model.name, num_classes, cfg.model.weights, model_options(cfg.model))
            if cfg.train.init_from:
                load_pretrained(model, cfg.train.init_from)
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
    model = model.to(rt.device, memory_format=rt.memory_format)
    ddp_model = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None) \
        if rt.world_size > 1 else model

    # -- loss, optimizer, schedule --------------------------------------------------------------------------
    class_weights = None
    if cfg.train.class_weights == "median_freq":
        class_weights = median_frequency_weights(*class_pixel_stats(train_index, decoder))
        log("median-frequency class weights: " + ", ".join(f"{c}={w:.2f}" for c, w in
                                                         zip(cfg.data.classes, class_weights.tolist())))
    elif cfg.train.class_weights is not None:
        class_weights = torch.tensor(cfg.train.class_weights, dtype=torch.float32)
    criterion = SegmentationLoss(cfg.train.loss, cfg.data.ignore_index, class_weights, cfg.model.aux_weight)
    criterion = criterion.to(rt.device)
    global_batch = cfg.train.batch_size * rt.world_size * cfg.train.accum_steps
    lr = cfg.train.lr * (global_batch / cfg.train.lr_reference_batch if cfg.train.lr_reference_batch else 1)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.train.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay)
    elif cfg.train.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.train.weight_decay)
    else:
        sys.exit(f"config error: train.optimizer={cfg.train.optimizer!r}; choose sgd or adamw")
    steps_per_epoch = len(train_loader) // cfg.train.accum_steps
    total_steps = max(1, cfg.train.epochs * steps_per_epoch)  # the schedule's length; max_steps only stops early
    max_steps = min(total_steps, cfg.train.max_steps or total_steps)
    warmup = min(cfg.train.warmup_steps, total_steps // 4)


    def lr_factor(step: int) -> float:
        """Linear warm-up, then polynomial decay to zero at total_steps (per optimizer step)."""
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, 1 - (step - warmup) / max(1, total_steps - warmup)) ** cfg.train.poly_power


    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.use_grad_scaler)

    # -- resume ---------------------------------------------------------------------------------------------
    state = TrainState()
    best_miou = -1.0
    resume = cfg.train.resume
    if resume == "auto":
        resume = str(out_dir / "last.pt") if (out_dir / "last.pt").is_file() else None
    if resume:
        ckpt = load_checkpoint(resume, map_location=rt.device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        state = TrainState(ckpt["epoch"], ckpt["step"], ckpt["batches_done"])
        best_miou = ckpt["best_miou"]
        log(f"resumed from {resume}: epoch {state.epoch}, step {state.step}, best mIoU {best_miou:.4f}")


    def checkpoint(miou: float) -> dict:
        """Everything needed to resume training, or to predict without the config file."""
        ckpt = {"format": FORMAT, "version": 1, "model_name": cfg.model.name, "num_classes": num_classes,
                "model_options": model_options(cfg.model),
                "model": model.state_dict(), "classes": list(cfg.data.classes), "palette": palette,
                "ignore_index": cfg.data.ignore_index, "mean": cfg.data.mean, "std": cfg.data.std,
                "eval_size": cfg.data.eval_size, "config": to_dict(cfg), "epoch": state.epoch, "step": state.step,
                "batches_done": state.batches_done, "best_miou": max(best_miou, miou), "miou": miou,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "versions": versions()}
        if compression:  # a pruned model: its widths are not the registry's, so the record must travel along
            ckpt["compression"] = compression
        return ckpt


    # -- logging ---------------------------------------------------------------------------------------------
    writer = None
    if rt.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / FINISHED).unlink(missing_ok=True)  # training again: not finished until it ends
        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        log(f"config (resolved): {out_dir / 'config.yaml'}")
        log(f"{rt.world_size} process(es) on {rt.device}, amp={rt.amp_dtype}, channels_last={rt.channels_last}, "
            f"global batch {global_batch}, lr {lr:.4g}, {steps_per_epoch} steps/epoch, {total_steps} steps"
            + (f" (stopping after {max_steps})" if max_steps < total_steps else ""))
        writer = SummaryWriter(str(out_dir / "tb"))


    def log_scalars(scalars: dict) -> None:
        for key, value in scalars.items():
            writer.add_scalar(key, value, state.step)


    def log_validation(metrics: dict, kept: list) -> None:
        log_scalars({"val/miou": metrics["miou"], "val/pixel_accuracy": metrics["pixel_accuracy"]})
        for name, iou in zip(cfg.data.classes, metrics["iou"]):
            if iou == iou:  # NaN: class absent from truth and prediction
                writer.add_scalar(f"val_iou/{name}", iou, state.step)
        for i, (image, truth, pred) in enumerate(kept):
            writer.add_image(f"val/sample_{i}", validation_panel(image, truth, pred), state.step)


    def validation_panel(image: torch.Tensor, truth: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """image | truth | prediction side by side (uint8 CHW), at the mask's resolution, for TensorBoard."""
        mean, std = torch.tensor(cfg.data.mean).view(3, 1, 1), torch.tensor(cfg.data.std).view(3, 1, 1)
        rgb = ((image.float().cpu() * std + mean).clamp(0, 1) * 255).to(torch.uint8)
        rgb = torch.nn.functional.interpolate(rgb[None].float(), size=truth.shape[-2:], mode="bilinear")[0]
        colours = torch.tensor(palette + [[0, 0, 0]] * (256 - len(palette)), dtype=torch.uint8)
        truth_rgb = colours[truth.long().clamp(0, 255)].permute(2, 0, 1)  # ignore_index shows black
        pred_rgb = colours[pred.long()].permute(2, 0, 1)
        return torch.cat([rgb.to(torch.uint8), truth_rgb, pred_rgb], dim=2)


    # SIGTERM (preemption, scancel, Ctrl-C): finish the current step, save last.pt, exit cleanly.
    stop_signal = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop_signal.append(signum))

    # -- the loop ----------------------------------------------------------------------------------------------
    exit_code = 0
    try:
        while state.epoch < cfg.train.epochs and state.step < max_steps:
            epoch_start = time.time()
            torch.manual_seed(cfg.train.seed + state.epoch)  # dropout draws depend on the epoch, not on history
            train_sampler.set_epoch(state.epoch, skip=state.batches_done * cfg.train.batch_size)
            train_one_epoch(ddp_model, criterion, optimizer, scheduler, scaler, train_loader, rt, state,
                            cfg.train.accum_steps, cfg.train.grad_clip, max_steps, lambda: bool(stop_signal),
                            log_scalars, cfg.train.log_every, device_augment)
            if state.batches_done >= len(base_sampler) // cfg.train.batch_size:  # the epoch is complete
                state.epoch, state.batches_done = state.epoch + 1, 0
            if stop_signal:  # preempted: save quickly and go; resume continues from the next batch
                if rt.is_main:
                    save_checkpoint(checkpoint(-1.0), out_dir / "last.pt")
                log(f"stopped by signal at step {state.step}; saved {out_dir / 'last.pt'}, "
                    f"resume with train.resume=auto")
                break
            miou = -1.0
            if state.epoch % cfg.train.val_every == 0 or state.epoch == cfg.train.epochs or state.step >= max_steps:
                cm, kept = evaluate(model, valid_loader, num_classes, cfg.data.ignore_index, rt,
                                    keep=cfg.train.num_vis if rt.is_main else 0)
                metrics = cm.compute()
                miou = metrics["miou"]
                if rt.is_main:
                    log_validation(metrics, kept)
            if rt.is_main:
                save_checkpoint(checkpoint(miou), out_dir / "last.pt")
                if miou > best_miou:
                    best_miou = miou
                    save_checkpoint(checkpoint(miou), out_dir / "best.pt")
                scores = (f"val mIoU {miou:.4f} (best {best_miou:.4f})" if miou >= 0 else
                          f"not validated (train.val_every={cfg.train.val_every})")
                log(f"epoch {state.epoch}: step {state.step}, {scores}, {time.time() - epoch_start:.1f} s")
    except NonFiniteLossError as e:
        log(f"error: {e}")
        exit_code = 1
    except DataError as e:
        print(f"data error on rank {rt.rank}: {e}", file=sys.stderr)
        exit_code = 1
    finally:
        if writer is not None:
            writer.close()
    if rt.is_main and exit_code == 0 and not stop_signal:
        mark_finished(out_dir, cfg.data.classes, best_miou)
        log(f"done: best validation mIoU {best_miou:.4f}, {out_dir / 'best.pt'}\n"
            f"next: python evaluate.py {out_dir / 'best.pt'}\n"
            f"      python infer.py IMAGES --checkpoint {out_dir / 'best.pt'}")
    dist_utils.cleanup()
    sys.exit(exit_code)
