"""train.py and the training loop: main(argv) in-process, real processes where they are the point (torchrun, signals,
spawned workers, torch.multiprocessing + gloo)."""
import contextlib
import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import train as train_script
from conftest import REPO, run_env
from segpipe.checkpoint import load_checkpoint, save_checkpoint
from segpipe.distributed import Runtime, ShardSampler, resolve_amp, resolve_augment_on
from segpipe.engine import TrainState, evaluate, train_one_epoch

TINY = ["model.name=lraspp_mobilenet_v3_large", "data.crop_size=[32,32]", "train.batch_size=2",
        "data.num_workers=0", "train.amp=none", "train.warmup_steps=1", "train.log_every=1", "train.num_vis=0"]


def data_args(root, out):
    return [f"data.root={root}", "data.classes=[a,b,c]", f"output_dir={out}"]


def train_command(root, out, *extra, torchrun=0, port=None, launcher_args=()) -> list:
    """train.py with the tiny settings, alone or under torchrun with that many processes."""
    launcher = [sys.executable, str(REPO / "train.py")]
    if torchrun:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}",
                    *(launcher_args or ["--master_addr=127.0.0.1", f"--master_port={port}"]), str(REPO / "train.py")]
    return launcher + ["--config", str(REPO / "configs/default.yaml")] + TINY + data_args(root, out) + list(extra)


def train(root, out, *extra, timeout=240, torchrun=0, port=None, env=None):
    """A tiny training run: train.py's main(argv) in this process, or a real process under torchrun or with env."""
    cmd = train_command(root, out, *extra, torchrun=torchrun, port=port)
    if torchrun or env:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or run_env(), cwd=REPO)
    return run_main(train_script.main, cmd[2:])


def run_main(main, argv: list) -> subprocess.CompletedProcess:
    """main(argv) in this process, with what it prints and its exit status, as a process would report them."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main(argv)
        except SystemExit as e:  # sys.exit("message"): the message goes to stderr, status 1
            code = e.code if isinstance(e.code, int) or e.code is None else (print(e.code, file=sys.stderr) or 1)
    return subprocess.CompletedProcess(argv, code or 0, stdout.getvalue(), stderr.getvalue())


def test_a_second_run_on_a_busy_output_dir_stops_at_once_and_touches_nothing(make_dataset, tmp_path):
    # A job resubmitted while the first still runs (a requeue, a double launch) must not write over its checkpoints.
    root, out = make_dataset(n_train=4, n_valid=3), tmp_path / "run"
    assert train(root, out, "train.epochs=1").returncode == 0
    before = (out / "last.pt").read_bytes()
    holds = ("import sys, time; from segpipe.outputs import lock_run_dir; lock = lock_run_dir(sys.argv[1]); "
             "print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", holds, str(out)], cwd=REPO, env=run_env(), stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = train(root, out, "train.epochs=2", "train.resume=auto")
        assert second.returncode == 1 and f"process {holder.pid} on " in second.stderr, second.stderr
        assert "in use by another training run" in second.stderr and len(second.stderr.splitlines()) == 1
        assert (out / "last.pt").read_bytes() == before
    finally:
        holder.kill()
        holder.wait()
    resumed = train(root, out, "train.epochs=2", "train.resume=auto")  # the lock went with the process
    assert resumed.returncode == 0 and load_checkpoint(out / "last.pt")["epoch"] == 2, resumed.stderr
    assert train(root, out, "train.epochs=3", "train.resume=auto").returncode == 0  # released by the run before


def test_single_process_run_writes_checkpoints_and_logs(make_dataset, tmp_path):
    root, out = make_dataset(n_train=4, n_valid=3), tmp_path / "run"
    result = train(root, out, "train.epochs=2", "train.val_every=2")
    assert result.returncode == 0, result.stderr
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["step"] == 4 and ckpt["classes"] == ["a", "b", "c"]
    assert ckpt["config"]["train"]["epochs"] == 2 and "torch" in ckpt["versions"]
    assert (out / "best.pt").is_file() and (out / "config.yaml").is_file()
    assert any((out / "tb").iterdir())
    assert "epoch 1: step 2, not validated (train.val_every=2)" in result.stdout
    assert "epoch 2: step 4, val mIoU" in result.stdout


def test_resume_gives_bitwise_identical_weights(make_dataset, tmp_path):
    root = make_dataset(n_train=4, n_valid=2)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(root, straight, "train.epochs=2").returncode == 0
    assert train(root, resumed, "train.epochs=2", "train.max_steps=2").returncode == 0  # stops after epoch 1
    result = train(root, resumed, "train.epochs=2", "train.resume=auto")
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout
    a, b = load_checkpoint(straight / "last.pt")["model"], load_checkpoint(resumed / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_two_processes(make_dataset, tmp_path, free_port):
    root, out = make_dataset(n_train=5, n_valid=3), tmp_path / "ddp"
    result = train(root, out, "train.epochs=1", torchrun=2, port=free_port)
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_checkpoint(out / "last.pt")["step"] == 1  # 5 images, 2 ranks x batch 2, last partial dropped
    assert (out / "best.pt").is_file()


def test_failing_rank_ends_the_job(make_dataset, tmp_path, free_port):
    root = make_dataset(n_train=2, n_valid=2)
    (root / "train" / "img001_mask.png").write_bytes(b"broken")  # read by exactly one of the two ranks
    start = time.monotonic()
    result = train(root, tmp_path / "fail", "train.epochs=1", "train.batch_size=1", torchrun=2, port=free_port,
                   timeout=180)
    assert result.returncode != 0
    assert "img001_mask.png: cannot decode the mask" in result.stdout + result.stderr
    assert time.monotonic() - start < 170


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(make_dataset, tmp_path):
    root, out = make_dataset(n_train=4, n_valid=2), tmp_path / "nan"
    assert train(root, out, "train.epochs=1").returncode == 0
    good = (out / "last.pt").read_bytes()
    result = train(root, out, "train.epochs=3", "train.lr=1e30", "train.lr_reference_batch=null",
                   "train.warmup_steps=0")
    assert result.returncode == 1
    assert "loss is nan" in result.stdout and "at step" in result.stdout and "train.lr" in result.stdout
    assert (out / "last.pt").read_bytes() == good


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])  # preemption / scancel; Ctrl-C
def test_stop_signal_saves_last_checkpoint_and_exits_cleanly(make_dataset, tmp_path, signum):
    root, out = make_dataset(n_train=4, n_valid=2), tmp_path / "term"
    proc = subprocess.Popen(train_command(root, out, "train.epochs=1000"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=run_env(), cwd=REPO)
    for line in proc.stdout:
        if line.startswith("epoch 1 1/"):
            proc.send_signal(signum)
            break
    output = proc.stdout.read()
    assert proc.wait(timeout=60) == 0, output
    ckpt = load_checkpoint(out / "last.pt")
    assert "stopped by signal" in output and ckpt["epoch"] >= 1
    assert not (out / "finished.json").exists() and "done: best" not in output  # not a finished run


def test_deeplab_with_batch_of_one_is_refused(make_dataset, tmp_path):
    root = make_dataset(n_train=2, n_valid=1)
    result = train(root, tmp_path / "b1", "model.name=deeplabv3_resnet50", "train.batch_size=1")
    assert result.returncode != 0 and "train.batch_size=2 or more" in result.stderr


def test_missing_data_root_says_what_to_do(tmp_path):
    result = train(tmp_path / "nowhere", tmp_path / "x")
    assert result.returncode != 0 and "configs/synthetic.yaml" in result.stderr


def test_fp16_on_cpu_is_refused_and_auto_picks_a_supported_dtype():
    with pytest.raises(ValueError, match="train.amp=fp16 on CPU"):
        resolve_amp("fp16", torch.device("cpu"))
    dtype, scaler = resolve_amp("auto", torch.device("cpu"))
    assert dtype in (None, torch.bfloat16) and not scaler


def test_augment_on_device_only_on_a_gpu_by_default():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_augment_on("auto", cuda) and not resolve_augment_on("auto", cpu)
    assert resolve_augment_on("device", cpu) and not resolve_augment_on("workers", cuda)
    with pytest.raises(ValueError, match="data.augment_on='gpu'; choose one of auto, workers, device"):
        resolve_augment_on("gpu", cuda)


def test_blur_jitter_and_normalise_in_the_training_step(make_dataset, tmp_path):
    root = make_dataset(n_train=4, n_valid=2)
    result = train(root, tmp_path / "dev", "train.max_steps=2", "data.augment_on=device", "data.blur_prob=1.0",
                   "data.color_jitter=0.2")
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(tmp_path / "dev" / "last.pt")["step"] == 2
    for wrong in (["data.augment_on=gpu"], ["train.amp=fp16"]):
        refused = train(root, tmp_path / "refused", "train.max_steps=1", *wrong)
        assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr
        assert refused.stderr.startswith("config error: " + wrong[0].split("=")[0]), refused.stderr


def test_atomic_save_never_leaves_a_broken_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"format": "segpipe-checkpoint", "v": torch.ones(3)}, path)

    def dies_halfway(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"format": "segpipe-checkpoint", "v": torch.zeros(3)}, path)
    assert torch.equal(load_checkpoint(path)["v"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_shard_sampler_covers_every_index_once():
    for n in (0, 1, 7, 10):
        for world in (1, 2, 3):
            shards = [list(ShardSampler(n, r, world)) for r in range(world)]
            assert sum(shards, []) == list(range(n))  # rank by rank, one contiguous block each
            assert max(map(len, shards)) - min(map(len, shards)) <= 1
            assert [len(ShardSampler(n, r, world)) for r in range(world)] == list(map(len, shards))


# -- DDP equivalence with real processes --------------------------------------------------------------------

class NoBatchNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))

    def forward(self, x):
        return {"out": self.body(x)}


def batches(per_rank: int, rank: int, world: int):
    g = torch.Generator().manual_seed(0)
    images, masks = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4, 8, 8), generator=g)
    rows = list(range(rank * per_rank, (rank + 1) * per_rank)) if world > 1 else list(range(per_rank))
    return [(images[rows], masks[rows])]


def one_step(rank: int, world: int, port: int, results):
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = NoBatchNormNet()
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    rt = Runtime(rank, rank, world, torch.device("cpu"), None, False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    criterion = lambda out, target: nn.functional.cross_entropy(out["out"], target)
    train_one_epoch(ddp, criterion, opt, sched, scaler, batches(4 // world, rank, world), rt, TrainState())
    if rank == 0:
        results.put({k: v.numpy().copy() for k, v in model.state_dict().items()})  # tensors would need the sender alive
    if world > 1:
        dist.destroy_process_group()


def test_ddp_step_on_two_ranks_matches_one_process_with_double_batch(free_port):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    one_step(0, 1, free_port, results)
    single = results.get()
    mp.start_processes(one_step, args=(2, free_port, results), nprocs=2, start_method="spawn")
    double = results.get()
    for k in single:
        assert np.allclose(single[k], double[k], atol=1e-5), k


def exact_once_eval(rank: int, world: int, port: int, n_images: int, results):
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = NoBatchNormNet().eval()
    g = torch.Generator().manual_seed(1)
    images, masks = torch.randn(n_images, 3, 8, 8, generator=g), torch.randint(0, 4, (n_images, 8, 8), generator=g)
    masks[:, 0] = 3  # ignored
    loader = [(images[i:i + 1], [masks[i]]) for i in ShardSampler(n_images, rank, world)]
    cm, _ = evaluate(model, loader, 3, 3, Runtime(rank, rank, world, torch.device("cpu"), None, False))
    if rank == 0:
        results.put(cm.matrix.numpy().copy())
    if world > 1:
        dist.destroy_process_group()


def test_exact_once_validation_on_odd_image_count(free_port):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    exact_once_eval(0, 1, free_port, 7, results)
    single = results.get()
    mp.start_processes(exact_once_eval, args=(2, free_port, 7, results), nprocs=2, start_method="spawn")
    assert np.array_equal(single, results.get())
    g = torch.Generator().manual_seed(1)
    torch.randn(7, 3, 8, 8, generator=g)
    masks = torch.randint(0, 4, (7, 8, 8), generator=g)
    masks[:, 0] = 3
    assert int(single.sum()) == int((masks != 3).sum())  # every image counted once, ignored pixels not at all


def test_rgb_masks_train_with_only_a_palette_in_the_config(make_dataset, tmp_path):
    palette = [[128, 64, 128], [70, 70, 70], [0, 0, 142]]
    root = make_dataset(n_train=2, n_valid=1, rgb_palette=palette)
    result = train(root, tmp_path / "rgb", "train.max_steps=1", "data.mask_format=rgb",
                   f"data.palette={palette}")
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(tmp_path / "rgb" / "last.pt")["palette"] == palette


def test_label_id_masks_train_with_a_label_map(make_dataset, tmp_path):
    root = make_dataset(n_train=2, n_valid=1, num_classes=3)  # raw ids 0, 1, 2
    result = train(root, tmp_path / "ids", "train.max_steps=1", "data.classes=[a,b]",
                   "data.label_map={0: 255, 1: 0, 2: 1}")
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(tmp_path / "ids" / "last.pt")["num_classes"] == 2


def test_unknown_classes_are_discovered_from_the_masks(make_dataset, tmp_path):
    root = make_dataset(n_train=2, n_valid=1, num_classes=3)
    result = train(root, tmp_path / "disc", "train.max_steps=1", "data.classes=null")
    assert result.returncode == 0, result.stderr
    assert "data.classes is not set: 2 of 2 training masks read: class-index masks, 3 classes" in result.stdout
    assert load_checkpoint(tmp_path / "disc" / "last.pt")["classes"] == ["class_0", "class_1", "class_2"]


def test_structured_pruning_fine_tunes_through_train_py(make_dataset, tmp_path):
    from segpipe.predict import Predictor
    root, out = make_dataset(n_train=4, n_valid=2), tmp_path / "run"
    small = ["model.name=resnet50_convhead", "model.output_stride=16", "model.head_depth=1", "model.head_width=16"]
    result = train(root, out, "train.epochs=1", *small)
    assert result.returncode == 0, result.stderr
    pruned = tmp_path / "pruned.pth"
    result = subprocess.run([sys.executable, "-m", "segpipe.compress", "prune", "--checkpoint", str(out / "best.pt"),
                             "--method", "structured", "--sparsity", "0.5", "--finetune-epochs", "1",
                             "--out", str(pruned)],
                            capture_output=True, text=True, timeout=400, env=run_env(), cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "before fine-tuning" in result.stdout
    final, source = load_checkpoint(pruned), load_checkpoint(out / "best.pt")
    record = final["compression"]
    assert record["method"] == "structured" and record["finetune_epochs"] == 1 and "optimizer" not in final
    assert 0 <= record["miou_before_finetune"] <= 1 and 0 <= record["miou_after_finetune"] <= 1
    before = load_checkpoint(tmp_path / "pruned-finetune" / "pruned.pth")["model"]
    assert any(not torch.equal(before[k], final["model"][k]) for k in before)  # fine-tuning trained it
    assert sum(v.numel() for v in final["model"].values()) < 0.9 * sum(v.numel() for v in source["model"].values())
    image = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8)
    assert Predictor.from_file(pruned, "cpu").predict(image).shape == (40, 56)  # the pruned widths rebuild
    wrong = train(root, tmp_path / "wrong", "train.max_steps=1", f"train.init_from={pruned}")  # default model
    assert wrong.returncode != 0 and "is a resnet50_convhead with" in wrong.stderr and "model.name" in wrong.stderr


def test_scripts_run_with_spawned_loader_workers(make_dataset, tmp_path):
    """macOS and Windows start DataLoader workers with spawn (Python 3.14 on Linux: forkserver), which imports
    the entry script again in each worker: the scripts must not run their body there."""
    (tmp_path / "spawn").mkdir()
    (tmp_path / "spawn" / "sitecustomize.py").write_text(
        "import multiprocessing\nmultiprocessing.set_start_method('spawn', force=True)\n")
    env = dict(run_env(), PYTHONPATH=f"{tmp_path / 'spawn'}{os.pathsep}{REPO}")
    root, out = make_dataset(n_train=4, n_valid=4), tmp_path / "run"
    commands = [
        [str(REPO / "train.py"), "--config", str(REPO / "configs/default.yaml"), *TINY, *data_args(root, out),
         "train.max_steps=1", "data.num_workers=1"],
        [str(REPO / "evaluate.py"), "--checkpoint", str(out / "best.pt"), "--workers", "1", "--batch-size", "2"],
        [str(REPO / "infer.py"), str(root / "valid"), "--checkpoint", str(out / "best.pt"), "--workers", "1",
         "--batch-size", "2", "--out", str(tmp_path / "pred")],
    ]
    for command in commands:
        result = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=300, env=env,
                                cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
    assert len(list((tmp_path / "pred").glob("*_mask.png"))) == 4


def test_validation_panel_colours_classes_as_visualize_does_and_ignored_pixels_black():
    from segpipe import training
    palette = [[255, 0, 0], [0, 255, 0], [0, 0, 255]]
    truth = torch.tensor([[0, 1], [2, 11]])  # 11: the ignore index
    pred = torch.tensor([[2, 1], [0, 0]])
    image = torch.zeros(3, 4, 4)  # the mean colour after normalisation
    panel = training.validation_panel(image, truth, pred, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], palette, 11)
    assert panel.dtype == torch.uint8 and panel.shape == (3, 2, 6)
    colours = torch.tensor(palette + [[0, 0, 0]], dtype=torch.uint8)
    assert torch.equal(panel[:, :, 2:4], colours[torch.tensor([[0, 1], [2, 3]])].permute(2, 0, 1))
    assert torch.equal(panel[:, :, 4:6], colours[pred].permute(2, 0, 1))
    assert panel[:, :, :2].float().sub(127.5).abs().max() <= 1  # the image: mid grey
