"""Distributed training as clusters drive it: signals, lost ranks, elastic restarts, other world sizes, GPU facts.

Real torchrun processes on CPU (gloo, 127.0.0.1) where the launcher's behaviour is the point; torch.multiprocessing
with gloo for collectives; the CUDA-only decisions with the CUDA facts faked (no GPU needed).
"""
import collections
import datetime
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from torch import nn

from conftest import REPO, random_mask, run_env, write_pair
from segpipe import checkpoint as checkpoint_module
from segpipe import distributed as dist_utils
from segpipe.checkpoint import load_checkpoint, save_checkpoint
from segpipe.config import load_config
from segpipe.distributed import Runtime, SeededSampler
from segpipe.engine import TrainState, model_seed, train_one_epoch
from segpipe.transforms import PixelOps
from test_train import NoBatchNormNet, train, train_command

import train as train_script
from segpipe import training

# 8 images, batch 2 on each of 2 ranks: 2 optimizer steps per epoch; workers as a cluster job has them.
RUN = ["train.epochs=3", "data.num_workers=1", "train.save_every=1"]


def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dataset(root: Path, n_train: int = 8, n_valid: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("valid", n_valid)):
        for i in range(n):
            write_pair(root / split, f"img{i:03d}", random_mask(rng, 40, 56, 3))
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(data root, last.pt weights) of an uninterrupted 2-process run of RUN."""
    base = tmp_path_factory.mktemp("reference")
    root = dataset(base / "data")
    result = train(root, base / "straight", *RUN, torchrun=2, port=port())
    assert result.returncode == 0, result.stderr[-3000:]
    return root, load_checkpoint(base / "straight" / "last.pt")["model"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def start(cmd: list, env=None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env or run_env(),
                            cwd=REPO)


def wait_for(proc: subprocess.Popen, prefix: str) -> list:
    """Read the output until a line starts with prefix; the lines read."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError("".join(lines[-40:]))


def rank_pid(agent: int, rank: int) -> int:
    """The pid of torchrun's worker process with this RANK (its children, by their environment)."""
    for child in Path(f"/proc/{agent}/task/{agent}/children").read_text().split():
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(child)
    raise AssertionError(f"no rank {rank} under {agent}")


# -- signals and lost ranks, with real torchrun -----------------------------------------------------------------

def test_sigterm_to_torchrun_with_loader_workers_saves_and_resumes_bitwise(reference, tmp_path):
    """torchrun forwards SIGTERM to each worker's process group, loader workers included: the workers ignore
    it, every rank finishes its step, rank 0 saves last.pt at that step and the ranks exit cleanly."""
    root, straight = reference
    out = tmp_path / "run"
    proc = start(train_command(root, out, *RUN, torchrun=2, port=port()))
    wait_for(proc, "epoch 1 1/")
    proc.send_signal(signal.SIGTERM)
    tic = time.monotonic()
    output = proc.stdout.read()
    proc.wait(timeout=90)
    stopped = re.search(r"stopped by signal at step (\d+)", output)
    assert stopped, output[-3000:]
    assert "killed by signal" not in output and f'File "{REPO / "train.py"}"' not in output, output[-3000:]
    # The workers ended by themselves: torchrun waits 30 s before it kills what is left. (The launcher then
    # re-raises the signal it got, torchrun's own behaviour, so its exit code is not the workers'.)
    assert "Unable to shutdown" not in output and time.monotonic() - tic < 25, output[-3000:]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["step"] == int(stopped.group(1)) < 6
    result = train(root, out, *RUN, "train.resume=auto", torchrun=2, port=port())
    assert result.returncode == 0, result.stderr[-3000:]
    assert same_weights(straight, load_checkpoint(out / "last.pt")["model"])


def test_sigterm_to_one_rank_ends_every_rank_cleanly(reference, tmp_path):
    root, _ = reference
    out = tmp_path / "one"
    proc = start(train_command(root, out, "train.epochs=1000", "data.num_workers=1", torchrun=2, port=port()))
    wait_for(proc, "epoch 1 1/")
    os.kill(rank_pid(proc.pid, 1), signal.SIGTERM)
    tic = time.monotonic()
    output = proc.stdout.read()
    assert proc.wait(timeout=60) == 0, output[-3000:]
    assert time.monotonic() - tic < 30
    assert "stopped by signal" in output and load_checkpoint(out / "last.pt")["step"] >= 2


def test_elastic_restart_after_a_killed_rank_matches_an_uninterrupted_run(reference, tmp_path):
    """torchrun --max-restarts=1 restarts the group when a rank dies; resume=auto continues from last.pt."""
    root, straight = reference
    out = tmp_path / "elastic"
    # The c10d rendezvous, as on a cluster: each restart is a new round with its own store prefix.
    cmd = train_command(root, out, *RUN, "train.resume=auto", torchrun=2, launcher_args=[
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port()}", "--max-restarts=1"])
    proc = start(cmd)
    wait_for(proc, "epoch 1 1/")
    os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
    output = proc.stdout.read()
    (tmp_path / "torchrun.log").write_text(output)
    assert proc.wait(timeout=180) == 0, output[-3000:]
    assert "resumed from" in output, output[-3000:]
    assert same_weights(straight, load_checkpoint(out / "last.pt")["model"])


# -- resume on another number of processes -------------------------------------------------------------------

@pytest.mark.parametrize("before, after", [(1, 2), (2, 1)])
def test_resume_on_another_world_size_trains_each_sample_once_at_its_lr(tmp_path, before, after):
    root, out, trace = dataset(tmp_path / "data", n_train=16), tmp_path / "run", tmp_path / "trace"
    trace.mkdir()
    env = dict(run_env(), SEGPIPE_TRACE_SAMPLES=str(trace))
    args = ["train.epochs=1", "data.num_workers=0"]  # no prefetch: the indices asked for are the ones trained
    first = train(root, out, *args, "train.max_steps=2", torchrun=before if before > 1 else 0, port=port(), env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert load_checkpoint(out / "last.pt")["samples_done"] == 2 * 2 * before
    second = train(root, out, *args, "train.resume=auto", torchrun=after if after > 1 else 0, port=port(), env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"global batch changed from {2 * before} ({before} process(es)) to {2 * after} ({after})" in second.stdout
    counts = collections.Counter(line.split()[1] for f in trace.iterdir() for line in f.read_text().splitlines()
                                 if line.split()[0] == "0")
    assert sorted(int(i) for i in counts) == list(range(16)) and set(counts.values()) == {1}, counts
    ckpt = load_checkpoint(out / "last.pt")
    lr = 0.01 * 2 * after / 8  # configs/default.yaml: lr 0.01 for a global batch of 8, scaled linearly
    assert ckpt["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(lr)
    assert ckpt["scheduler"]["base_lrs"] == [pytest.approx(lr)]
    assert (ckpt["epoch"], ckpt["step"], ckpt["world_size"]) == (1, 16 // (2 * after), after)


# -- smaller defects, real processes ----------------------------------------------------------------------------

def test_model_without_aux_weight_trains_on_two_ranks(tmp_path):
    from segpipe.predict import Predictor
    root, out = dataset(tmp_path / "data"), tmp_path / "aux"
    # DDP fails on the second step when a head had no gradient in the first.
    result = train(root, out, "model.name=deeplabv3_mobilenet_v3_large", "model.aux_weight=0", "train.max_steps=2",
                   torchrun=2, port=port())
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["step"] == 2 and not any(k.startswith("aux_classifier") for k in ckpt["model"])
    image = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8)
    assert Predictor.from_file(out / "best.pt", "cpu").predict(image).shape == (40, 56)


def test_accumulation_remainder_does_not_leak_into_the_next_epoch(tmp_path):
    """6 images, batch 2, accum_steps 2: 3 micro-batches an epoch, the third cannot fill a step. A run that
    stops after epoch 0 and resumes must match one that does not stop (poly schedule: the same lr per step)."""
    root = dataset(tmp_path / "data", n_train=6)
    args = ["train.accum_steps=2", "train.warmup_steps=0"]
    assert train(root, tmp_path / "straight", *args, "train.epochs=2").returncode == 0
    assert train(root, tmp_path / "resumed", *args, "train.epochs=1").returncode == 0
    result = train(root, tmp_path / "resumed", *args, "train.epochs=2", "train.resume=auto")
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["step"] == 2
    assert same_weights(load_checkpoint(tmp_path / "straight" / "last.pt")["model"],
                        load_checkpoint(tmp_path / "resumed" / "last.pt")["model"])


# -- collectives and host reads per optimizer step ---------------------------------------------------------------

def micro_batches(n: int, rank: int):
    g = torch.Generator().manual_seed(rank)
    return [(torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 3, (2, 8, 8), generator=g)) for _ in range(n)]


def tiny_training(rank: int, world: int):
    torch.manual_seed(0)
    model = NoBatchNormNet()
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # AdamW reads its step counters itself
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    criterion = lambda out, target: nn.functional.cross_entropy(out["out"], target)
    return ddp, criterion, opt, sched, scaler, Runtime(rank, rank, world, torch.device("cpu"), None, False)


def count_collectives(rank: int, world: int, port: int, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    calls = []
    for name in ("all_reduce", "all_gather", "broadcast", "all_gather_object", "broadcast_object_list"):
        real = getattr(dist, name)
        setattr(dist, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    ddp, criterion, opt, sched, scaler, rt = tiny_training(rank, world)
    state = TrainState()
    train_one_epoch(ddp, criterion, opt, sched, scaler, micro_batches(6, rank), rt, state, accum_steps=2,
                    log_every=1000)
    if rank == 0:
        results.put((len(calls), state.step))
    dist.destroy_process_group()


def test_at_most_one_collective_per_optimizer_step_besides_ddps():
    results = mp.get_context("spawn").Queue()
    mp.start_processes(count_collectives, args=(2, port(), results), nprocs=2, start_method="spawn")
    calls, steps = results.get()
    assert steps == 3 and calls <= steps


def test_loss_read_on_the_host_only_at_logging_steps(monkeypatch):
    reads = []
    for name in ("item", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, _real=real, _name=name: (reads.append(_name), _real(t))[1])
    logged = []
    ddp, criterion, opt, sched, scaler, rt = tiny_training(0, 1)
    state = TrainState()
    train_one_epoch(ddp, criterion, opt, sched, scaler, micro_batches(8, 0), rt, state, accum_steps=2,
                    log=lambda scalars, step: logged.append(step), log_every=2)
    assert state.step == 4 and logged == [2, 4]
    assert len(reads) <= state.step + len(logged)  # one flag read per step, one loss read per log line


def test_logged_loss_is_the_mean_over_the_interval():
    logged = []
    ddp, criterion, opt, sched, scaler, rt = tiny_training(0, 1)
    expected = [criterion(ddp(images), masks).item() for images, masks in micro_batches(2, 0)]  # before any step
    train_one_epoch(ddp, criterion, opt, sched, scaler, micro_batches(2, 0), rt, TrainState(), accum_steps=2,
                    log=lambda scalars, step: logged.append(scalars["train/loss"]), log_every=1)
    assert logged == [pytest.approx(np.mean(expected), rel=1e-6)]


@pytest.mark.parametrize("color_jitter", [0.0, 0.3])
def test_device_pixel_work_keeps_its_constants_on_the_device(color_jitter):
    ops = PixelOps([0.5, 0.5, 0.5], [0.2, 0.2, 0.2], 5, color_jitter)
    images = torch.zeros(2, 3, 16, 16, dtype=torch.uint8, device="meta")  # stands in for a GPU
    params = torch.tensor([[1.0, 1.1, 0.9, 1.2, 0, 1, 2, 3], [0.0, 0.8, 1.3, 1.0, 3, 2, 1, 0]])  # on the CPU
    out = ops(images, params)  # one image blurred, one not
    assert out.device.type == "meta" and out.shape == images.shape
    assert all(t.device.type == "meta" for t in (ops.scale, ops.shift, ops.mean, ops.std))


# -- resume decided by rank 0 --------------------------------------------------------------------------------

def resume_on_two_ranks(rank: int, world: int, port: int, folders: list, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = load_config(None, [f"output_dir={folders[rank]}", "train.resume=auto"])
    found = training.resume_checkpoint(cfg, Runtime(rank, rank, world, torch.device("cpu"), None, False))
    results.put((rank, None if found is None else (found[0], found[1]["step"])))
    dist.destroy_process_group()


def test_rank_zero_decides_what_to_resume_from(tmp_path):
    """Two nodes without a shared output folder: only rank 0's has last.pt; rank 1 gets it by broadcast."""
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node1.mkdir()
    # A last.pt carries the training state (checkpoint.RESUME_KEYS); resume refuses files without it.
    save_checkpoint({"format": "segpipe-checkpoint", "model": {}, "optimizer": {}, "scheduler": {}, "scaler": {},
                     "epoch": 0, "step": 7, "best_miou": -1.0}, node0 / "last.pt")
    results = mp.get_context("spawn").Queue()
    mp.start_processes(resume_on_two_ranks, args=(2, port(), [str(node0), str(node1)], results), nprocs=2,
                       start_method="spawn")
    got = dict(results.get() for _ in range(2))
    assert got[0] == got[1] == (str(node0 / "last.pt"), 7)


# -- CUDA-only decisions, with the CUDA facts faked -------------------------------------------------------------

@pytest.fixture
def fake_gpu(monkeypatch):
    """setup() on 'cuda:0' without a GPU; returns a function to set the compute capability."""
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # V100 says so
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    capability = {}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    return lambda value: capability.update(value=value)


@pytest.mark.parametrize("capability, dtype, scaler", [((7, 0), torch.float16, True), ((7, 5), torch.float16, True),
                                                       ((8, 0), torch.bfloat16, False),
                                                       ((9, 0), torch.bfloat16, False)])
def test_amp_auto_picks_bf16_only_from_ampere_on(fake_gpu, capability, dtype, scaler):
    fake_gpu(capability)
    rt = dist_utils.setup("cuda:0", amp="auto")
    assert (rt.amp_dtype, rt.use_grad_scaler) == (dtype, scaler)
    assert torch.backends.cudnn.benchmark  # fixed-size training crops: cuDNN picks its kernels once


def test_process_group_timeout_comes_from_the_config(monkeypatch):
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **k: seen.update(k, backend=backend))
    cfg = load_config(None, ["train.dist_timeout_s=1800"])
    training.setup_runtime(cfg)
    assert seen["timeout"] == datetime.timedelta(seconds=1800) and seen["backend"] == "gloo"


def test_resume_loads_the_checkpoint_on_the_cpu_for_a_gpu_run(tmp_path, monkeypatch):
    """The optimizer's step counters must stay on the CPU (AdamW syncs with the GPU every step otherwise)."""
    save_checkpoint({"format": "segpipe-checkpoint", "model": {}, "optimizer": {}, "scheduler": {}, "scaler": {},
                     "epoch": 0, "step": 3, "best_miou": -1.0}, tmp_path / "last.pt")
    seen = []
    real = checkpoint_module.load_checkpoint
    monkeypatch.setattr(checkpoint_module, "load_checkpoint",
                        lambda path, map_location="cpu": (seen.append(map_location), real(path, map_location))[1])
    cfg = load_config(None, [f"output_dir={tmp_path}", "train.resume=auto"])
    gpu = Runtime(0, 0, 1, torch.device("cuda", 0), torch.bfloat16, False)
    path, ckpt = training.resume_checkpoint(cfg, gpu)
    assert seen == ["cpu"] and ckpt["step"] == 3


@pytest.mark.parametrize("saved_enabled, now_enabled", [(False, True), (True, False)])
def test_resume_after_a_precision_change(saved_enabled, now_enabled):
    """A bf16/fp32 checkpoint resumed with fp16 (and back): the gradient scaler starts fresh, no crash."""
    saved = torch.amp.GradScaler("cpu", enabled=saved_enabled).state_dict()
    scaler = torch.amp.GradScaler("cpu", enabled=now_enabled)
    notes = []
    training.restore_scaler(scaler, saved, notes.append)
    assert len(notes) == 1 and "precision" in notes[0]
    assert scaler.is_enabled() == now_enabled


def test_model_randomness_differs_across_ranks_and_repeats_on_resume():
    seeds = {model_seed(0, rank, step) for rank in range(4) for step in range(100)}
    assert len(seeds) == 400 and model_seed(0, 1, 5) == model_seed(0, 1, 5)


def test_sampler_positions_are_global():
    """After k global micro-batches on any world size, the same first k * batch * world positions are done."""
    n, batch = 16, 2
    done = [i for r in range(2) for i, _ in list(SeededSampler(n, r, 2, 0, batch))[:2 * batch]]  # 2 steps, world 2
    rest = SeededSampler(n, 0, 1, 0, batch)
    rest.set_epoch(0, start=2 * batch * 2)
    assert sorted(done + [i for i, _ in rest]) == list(range(n))


# -- launch files for SLURM and Kubernetes -------------------------------------------------------------------------

def train_arguments(command: list) -> list:
    """The arguments after train.py in a launcher's command line."""
    at = next(i for i, word in enumerate(command) if word.endswith("train.py"))
    return command[at + 1:]


def check_accepted(arguments: list) -> None:
    args = train_script.get_args_parser().parse_args([a.replace("$", "X") for a in arguments])
    config = REPO / args.config
    assert config.is_file(), args.config
    cfg = load_config(config, args.overrides)
    assert cfg.train.resume == "auto" and cfg.train.save_every, "restarts need resume=auto and periodic saves"


def test_slurm_script_runs_a_command_train_py_accepts():
    text = (REPO / "deploy/slurm/train.sbatch").read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=" in text and "scontrol requeue" in text
    lines = [line.strip() for line in text.replace("\\\n", " ").splitlines()]
    srun = [line for line in lines if line.startswith("srun ") and "train.py" in line]
    assert len(srun) == 1
    command = shlex.split(srun[0].rstrip("&"))
    assert "--rdzv-backend=c10d" in command and any(a.startswith("--max-restarts=") for a in command)
    check_accepted(train_arguments(command))


def test_kubernetes_job_runs_a_command_train_py_accepts():
    documents = [d for f in sorted((REPO / "deploy/k8s").glob("*.yaml"))
                 for d in yaml.safe_load_all(f.read_text()) if d]
    jobs = [d for d in documents if d["kind"] == "PyTorchJob"]
    assert jobs, "deploy/k8s has no PyTorchJob"
    for job in jobs:
        assert job["spec"]["elasticPolicy"]["maxRestarts"] >= 1
        for replica in job["spec"]["pytorchReplicaSpecs"].values():
            container = replica["template"]["spec"]["containers"][0]
            check_accepted(train_arguments(container["command"] + container.get("args", [])))
