"""Tar shards: writing (atomic, resumable, checked), reading at offsets locally and over HTTP (a real http.server on
127.0.0.1), the shard-window sampler's contract, training from shards (alone and with 2 ranks under torchrun),
and the faults: truncated or rewritten shards, 404, checksum mismatch, unreachable or stalling servers, full cache."""
import errno
import hashlib
import io
import json
import multiprocessing
import os
import sys
import subprocess
import tarfile
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from benchmarks.slow_server import SlowServer
from conftest import REPO, run_env, unused_port
from segpipe.checkpoint import load_checkpoint
from segpipe.config import ConfigError, load_config
from segpipe.data import DataError, MaskDecoder, SegmentationDataset
from segpipe.discover import apply_discovery
from segpipe.distributed import SeededSampler, ShardWindowSampler
from segpipe.shards import ShardStore, index_shards, open_index, open_split, write as write_module
from segpipe.shards.store import ShardInfo
from segpipe.shards.write import write_shards
from segpipe.transforms import train_transform
from segpipe.shards import __main__ as shards_cli
from test_train import train

SHARD = 6000  # bytes: about two 40x56 pairs per shard


@pytest.fixture
def shards(make_dataset, tmp_path):
    """(folder data root, shard folder) of 8 train + 3 valid pairs in several shards."""
    root = make_dataset(n_train=8, n_valid=3)
    write_shards(str(root), str(tmp_path / "shards"), SHARD, log=lambda *a: None)
    return root, tmp_path / "shards"


def folder_bytes(root: Path, split: str, name: str) -> tuple[bytes, bytes]:
    return (root / split / f"{name}.jpg").read_bytes(), (root / split / f"{name}_mask.png").read_bytes()


# -- writing -------------------------------------------------------------------------------------------------------

def test_shards_hold_the_original_bytes_in_webdataset_layout(shards):
    root, out = shards
    descriptor = json.loads((out / "shards.json").read_text())
    train_shards = descriptor["splits"]["train"]["shards"]
    assert len(train_shards) >= 3 and descriptor["splits"]["train"]["samples"] == 8
    names = []
    for entry in train_shards:
        tar_bytes = (out / entry["name"]).read_bytes()
        assert hashlib.sha256(tar_bytes).hexdigest() == entry["sha256"] and len(tar_bytes) == entry["bytes"]
        with tarfile.open(out / entry["name"]) as tar:
            members = tar.getnames()
            assert members == [m for key, *_ in entry["members"] for m in (f"{key}.jpg", f"{key}.mask.png")]
            for key, *_ in entry["members"]:
                image, mask = folder_bytes(root, "train", key)
                assert tar.extractfile(f"{key}.jpg").read() == image
                assert tar.extractfile(f"{key}.mask.png").read() == mask
        names += [m[0] for m in entry["members"]]
    assert names == [f"img{i:03d}" for i in range(8)]  # the folder index's order: sample i is the same sample
    index = open_index(str(out / "shards.json"), "train")
    for i in range(8):
        (image, _), (mask, where) = index.sources(i)
        assert (image.read(), mask.read()) == folder_bytes(root, "train", f"img{i:03d}")
        assert where.endswith(f"train-{int(index.shard_of[i]):06d}.tar: img{i:03d}.mask.png")
    assert index.image_size(3) == (40, 56)


def test_killed_writer_continues_and_never_rewrites_a_finished_shard(make_dataset, tmp_path, monkeypatch):
    root = make_dataset(n_train=8, n_valid=3)
    out = tmp_path / "shards"
    calls = Counter()
    real = write_module.pack_shard

    def dies_in_the_third_shard(index, position, path, shard_bytes):
        calls["pack"] += 1
        if calls["pack"] == 3:
            path.write_bytes(b"half a shard")  # what a killed run leaves
            raise KeyboardInterrupt
        return real(index, position, path, shard_bytes)

    monkeypatch.setattr(write_module, "pack_shard", dies_in_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        write_shards(str(root), str(out), SHARD, log=lambda *a: None)
    assert not (out / "shards.json").exists() and (out / ".train-000002.tar.partial").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert sorted(finished) == ["train-000000.tar", "train-000001.tar"]
    monkeypatch.setattr(write_module, "pack_shard", real)
    write_shards(str(root), str(out), SHARD, log=lambda *a: None)
    assert all((out / name).stat().st_mtime_ns == t for name, t in finished.items())
    assert not list(out.glob(".*.partial"))
    clean = tmp_path / "clean"
    write_shards(str(root), str(clean), SHARD, log=lambda *a: None)
    assert (out / "shards.json").read_text() == (clean / "shards.json").read_text()


@pytest.mark.parametrize("fault, named", [("missing mask", "img001.jpg"), ("corrupt image", "img002.jpg"),
                                          ("size mismatch", "img003_mask.png")])
def test_writer_stops_at_a_bad_pair_naming_the_file(make_dataset, tmp_path, fault, named):
    root = make_dataset(n_train=5, n_valid=2)
    if fault == "missing mask":
        (root / "train" / "img001_mask.png").unlink()
    elif fault == "corrupt image":
        data = (root / "train" / "img002.jpg").read_bytes()
        (root / "train" / "img002.jpg").write_bytes(data[: len(data) // 2])
    else:
        from PIL import Image
        Image.new("L", (10, 10)).save(root / "train" / "img003_mask.png")
    with pytest.raises(DataError, match=named):
        write_shards(str(root), str(tmp_path / "shards"), SHARD, log=lambda *a: None)
    assert not (tmp_path / "shards" / "shards.json").exists()


def test_python_m_segpipe_shards_write_and_its_bad_input(make_dataset, tmp_path, capsys):
    root = make_dataset(n_train=3, n_valid=2)
    argv = ["write", str(root), str(tmp_path / "out"), "--shard-size", "5kB"]
    assert shards_cli.main(argv) == 0
    assert f"data.root={tmp_path / 'out' / 'shards.json'}" in capsys.readouterr().out
    assert shards_cli.main(argv[:-1] + ["5 parsecs"]) == 1
    assert capsys.readouterr().err == "error: '5 parsecs' is not a size; write it as 256MB, 20GB or 1.5TiB\n"
    (root / "valid" / "img001.jpg").write_bytes(b"not a JPEG")
    assert shards_cli.main(["write", str(root), str(tmp_path / "other")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("data error: ") and "img001.jpg: cannot" in err and err.count("\n") == 1


def test_shard_with_a_sample_without_its_mask_is_named(tmp_path):
    """Tars made by other tools get a descriptor from `python -m segpipe.shards index`, which checks pairing."""
    folder = tmp_path / "foreign"
    folder.mkdir()
    from PIL import Image
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="JPEG")
    with tarfile.open(folder / "train-000000.tar", "w") as tar:
        for member in ("a.jpg", "a.mask.png", "b.jpg"):
            data = buffer.getvalue() if member.endswith(".jpg") else _png()
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match=r"train-000000.tar: 1 sample\(s\) have no mask, e.g. b \(no b.mask.png"):
        index_shards(str(folder), log=lambda *a: None)


def _png() -> bytes:
    from PIL import Image
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    return buffer.getvalue()


# -- the shard-window sampler ---------------------------------------------------------------------------------------

def test_shard_window_sampler_keeps_the_seeded_sampler_contract():
    sizes, step = [5, 3, 4, 6, 2, 5], 2  # 25 samples in 6 shards
    starts = np.cumsum([0] + sizes)
    shard_of = lambda i: int(np.searchsorted(starts, i, side="right") - 1)  # noqa: E731
    one = ShardWindowSampler(sizes, 0, 1, seed=3, step_samples=step, window=2)
    orders = []
    for epoch in range(2):
        one.set_epoch(epoch)
        order = one.order()
        assert sorted(order) == list(range(25))  # every sample once per epoch
        # a window's samples come from 2 shards only, whole
        windows = [{shard_of(i) for i in order[a:b]} for a, b in _window_bounds(order, shard_of, sizes)]
        assert all(len(w) <= 2 for w in windows) and sum(len(w) for w in windows) == 6
        orders.append(order)
    assert orders[0] != orders[1]
    # world 1 and world 2: the same samples per epoch (all but the tail shorter than one global step), equal counts
    ranks = [ShardWindowSampler(sizes, r, 2, seed=3, step_samples=step, window=2) for r in range(2)]
    for r in ranks:
        r.set_epoch(1)
    seen = [[i for i, _ in r] for r in ranks]
    assert len(seen[0]) == len(seen[1]) == 12 and ranks[0].steps() == 6
    assert sorted(seen[0] + seen[1]) == sorted(orders[1][:24])
    one.set_epoch(1)
    assert sorted(i for i, _ in one) == sorted(orders[1][:24])
    # resume mid-epoch at global sample 8 on another world size: the rest of the same epoch, same seeds
    rest = ShardWindowSampler(sizes, 0, 1, seed=3, step_samples=step, window=2)
    rest.set_epoch(1, start=8)
    assert list(rest) == list(one)[8:]
    # a window covering every shard is exactly SeededSampler's order
    full, seeded = ShardWindowSampler(sizes, 1, 2, 3, step, window=6), SeededSampler(25, 1, 2, 3, step)
    full.set_epoch(4, start=4)
    seeded.set_epoch(4, start=4)
    assert list(full) == list(seeded)


def _window_bounds(order, shard_of, sizes):
    """Start and end of each window in an order: a window ends when its shards' samples are all out."""
    bounds, start, left, shards = [], 0, 0, set()
    for pos, i in enumerate(order):
        k = shard_of(i)
        if k not in shards:
            shards.add(k)
            left += sizes[k]
        left -= 1
        if left == 0:
            bounds.append((start, pos + 1))
            start, shards = pos + 1, set()
    return bounds


def test_loader_order_is_the_same_for_0_1_and_2_workers(shards):
    _, out = shards
    cfg = load_config(None, ["data.crop_size=[24,24]"]).data
    index = open_index(str(out / "shards.json"), "train")
    dataset = SegmentationDataset(index, MaskDecoder(3, 255), train_transform(cfg))
    runs = []
    for workers in (0, 1, 2):
        sampler = ShardWindowSampler(index.shard_sizes, 0, 1, seed=1, step_samples=2, window=2)
        sampler.set_epoch(1)
        loader = DataLoader(dataset, 2, sampler=sampler, num_workers=workers)
        runs.append([torch.cat([images.flatten(), masks.flatten().float()]) for images, masks in loader])
    assert len(runs[0]) == 4
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))


# -- training from shards ---------------------------------------------------------------------------------------------

def test_training_from_local_shards_matches_the_folder_bitwise_and_resumes_mid_epoch(shards, tmp_path):
    """A window covering every shard gives the folder's order: the same weights and mIoU. Stopped mid-epoch
    (max_steps 3 of 4 per epoch) and resumed, the shard run ends bitwise where the straight one does."""
    root, out = shards
    run = ("train.epochs=2", "data.shuffle_window=8")
    for data, folder in ((root, "folder"), (out / "shards.json", "straight"), (out / "shards.json", "resumed")):
        result = train(data, tmp_path / folder, *run, *(["train.max_steps=3"] if folder == "resumed" else []))
        assert result.returncode == 0, result.stderr
    a, b = load_checkpoint(tmp_path / "folder" / "last.pt"), load_checkpoint(tmp_path / "straight" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and a["miou"] == b["miou"] > 0
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["samples_done"] == 6
    resumed = train(out / "shards.json", tmp_path / "resumed", *run, "train.resume=auto")
    assert resumed.returncode == 0 and "sample 6 of the epoch" in resumed.stdout, resumed.stderr
    c = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert all(torch.equal(b["model"][k], c["model"][k]) for k in b["model"]) and c["miou"] == b["miou"]


def test_two_ranks_train_over_http_each_sample_once_one_download_per_shard(shards, tmp_path, free_port):
    """torchrun with 2 ranks reads the shards from a slow HTTP server through one shared cache, discovers the
    classes from the shards' masks, and trains every sample of an epoch exactly once, in the shard-window order
    (one shard at a time); stopped mid-epoch and resumed, it ends bitwise where the straight run does."""
    _, out = shards
    trace, cache = tmp_path / "trace", tmp_path / "cache"
    trace.mkdir()
    run = ("train.epochs=2", "data.shuffle_window=1", f"data.cache_dir={cache}", "data.classes=null")
    with SlowServer(out, delay_s=0.02) as server:
        result = train(f"{server.url}/shards.json", tmp_path / "run", *run, torchrun=2, port=free_port,
                       env=run_env() | {"SEGPIPE_TRACE_SAMPLES": str(trace)})
        requests = dict(server.requests)
        for extra in (["train.max_steps=3"], ["train.resume=auto"]):  # stops after step 1 of epoch 2, then resumes
            resumed = train(f"{server.url}/shards.json", tmp_path / "resumed", *run, *extra, torchrun=2,
                            port=free_port)
            assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "sample 4 of the epoch" in resumed.stdout, resumed.stdout[-3000:]
    straight = load_checkpoint(tmp_path / "run" / "last.pt")
    stopped = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert all(torch.equal(straight["model"][k], stopped["model"][k]) for k in straight["model"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data.classes is not set" in result.stdout and "3 classes" in result.stdout
    descriptor = json.loads((out / "shards.json").read_text())
    for split in ("train", "valid"):
        for entry in descriptor["splits"][split]["shards"]:
            assert requests[entry["name"]] == 1, requests  # the cache is shared by both ranks
    assert_each_sample_once(trace, epochs=2)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 4


def assert_each_sample_once(trace: Path, epochs: int, samples: int = 8) -> None:
    """Every training sample was loaded once per epoch over all ranks and workers (SEGPIPE_TRACE_SAMPLES files)."""
    lines = [line.split() for f in trace.iterdir() for line in f.read_text().splitlines()]
    for epoch in range(epochs):
        seen = [int(i) for e, i in lines if e == str(epoch)]
        assert len(seen) == len(set(seen)) == samples, seen  # 8 samples, 2 steps of 2 x 2 ranks: each once


def uploads(folder: Path) -> list[Path]:
    """What a user uploads of a shard folder: the shards and shards.json."""
    return [*sorted(folder.glob("*.tar")), folder / "shards.json"]


@pytest.fixture
def s3_bucket(shards, monkeypatch):
    """The shard folder uploaded to s3://seg/set/ on a moto S3 server on 127.0.0.1 (the S3 API, not AWS); the
    environment points boto's endpoint at it, as a user does for MinIO. Skipped without moto and s3fs."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    pytest.importorskip("s3fs", reason="s3fs is not installed")
    import boto3
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server.get_host_and_port()[1]  # the port the OS gave it
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3")
    client.create_bucket(Bucket="seg")
    for path in uploads(shards[1]):
        client.upload_file(str(path), "seg", f"set/{path.name}")
    yield "s3://seg/set/shards.json", env
    server.stop()


def test_two_ranks_with_loader_workers_train_from_s3_each_sample_once(shards, s3_bucket, tmp_path, free_port):
    """The s3:// path end to end through s3fs, in forked loader workers of 2 torchrun ranks: the bytes are the local
    shards', every sample of an epoch is trained once, a missing key is one line."""
    root, out = shards
    url, env = s3_bucket
    local = open_split(str(out / "shards.json"), "train")
    remote = open_split(url, "train", str(tmp_path / "cache"), "1MB")
    for i in range(len(local)):
        assert remote.image_source(i)[0].read() == local.image_source(i)[0].read()
        assert remote.mask_source(i)[0].read() == local.mask_source(i)[0].read()
    trace = tmp_path / "trace"
    trace.mkdir()
    result = train(url, tmp_path / "run", "train.epochs=2", "data.shuffle_window=1", "data.num_workers=1",
                   f"data.cache_dir={tmp_path / 'cache2'}", torchrun=2, port=free_port,
                   env=run_env() | env | {"SEGPIPE_TRACE_SAMPLES": str(trace)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert_each_sample_once(trace, epochs=2)
    cached = sorted(p.name for p in (tmp_path / "cache2" / "shards").rglob("*.tar"))
    assert cached and len(cached) == len(set(cached))  # one copy per shard for both ranks and their workers
    with pytest.raises(DataError, match=r"s3://seg/gone/shards.json does not exist on the server"):
        open_split("s3://seg/gone/shards.json", "train", str(tmp_path / "cache"))


@pytest.fixture
def gs_bucket(shards):
    """The shard folder uploaded to gs://seg/set/ on a GCS emulator (gcp-storage-emulator) on 127.0.0.1, and the
    environment that points gcsfs at it. Skipped without gcsfs and the emulator."""
    pytest.importorskip("gcsfs", reason="gcsfs is not installed")
    emulator = pytest.importorskip("gcp_storage_emulator.server", reason="gcp-storage-emulator is not installed")
    port = unused_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket="seg")
    server.start()
    try:
        for path in uploads(shards[1]):
            name = urllib.parse.quote(f"set/{path.name}", safe="")
            upload = f"http://127.0.0.1:{port}/upload/storage/v1/b/seg/o?uploadType=media&name={name}"
            urllib.request.urlopen(urllib.request.Request(upload, data=path.read_bytes(), method="POST")).read()
        # gcsfs's default filesystem first asks a gRPC control API for the bucket's layout, which emulators lack
        yield "gs://seg/set/shards.json", {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
                                           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    finally:
        server.stop()  # its thread is not a daemon


def test_two_ranks_with_loader_workers_train_and_evaluate_from_gs(shards, gs_bucket, tmp_path, free_port):
    """The gs:// path end to end through gcsfs (in fresh processes: gcsfs reads its settings on import): 2 torchrun
    ranks with a loader worker each train every sample of an epoch once, evaluate.py scores the valid shards, and
    a missing object is one line."""
    url, gs_env = gs_bucket
    trace = tmp_path / "trace"
    trace.mkdir()
    env = run_env() | gs_env | {"SEGPIPE_TRACE_SAMPLES": str(trace)}
    result = train(url, tmp_path / "run", "train.epochs=2", "data.shuffle_window=1", "data.num_workers=1",
                   f"data.cache_dir={tmp_path / 'cache'}", torchrun=2, port=free_port, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_each_sample_once(trace, epochs=2)
    def evaluate(data_root: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "evaluate.py"), str(tmp_path / "run" / "best.pt"),
                               "--data-root", data_root, "--out", str(tmp_path / "eval"), "--workers", "0"],
                              env=run_env() | gs_env, capture_output=True, text=True, timeout=120, cwd=tmp_path)

    scored = evaluate(url)
    assert scored.returncode == 0 and "3 images in" in scored.stdout, scored.stderr[-3000:]
    missing = evaluate("gs://seg/gone/shards.json")
    assert missing.returncode == 1 and "gs://seg/gone/shards.json does not exist on the server" in missing.stderr
    assert "Traceback" not in missing.stderr and len(missing.stderr.splitlines()) <= 2, missing.stderr


def test_stalled_s3_endpoint_ends_after_the_stores_attempts(tmp_path, monkeypatch):
    """An S3 endpoint that accepts connections and never answers: the store's attempts with its timeout, then one
    error naming the shard URL (s3fs and botocore retrying on their own made it 25 tries per attempt)."""
    pytest.importorskip("s3fs", reason="s3fs is not installed")
    import contextlib
    import socket
    import threading
    listener = socket.create_server(("127.0.0.1", 0))
    connections = []

    def accept_and_say_nothing():
        with contextlib.suppress(OSError):  # until the listener is closed
            while True:
                connections.append(listener.accept()[0])

    threading.Thread(target=accept_and_say_nothing, daemon=True).start()
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{listener.getsockname()[1]}"}.items():
        monkeypatch.setenv(key, value)
    store = ShardStore("s3://seg/stall/shards.json", str(tmp_path / "cache"), 10 ** 6, timeout_s=0.3, attempts=2)
    with pytest.raises(DataError, match=r"s3://seg/stall/train-000000.tar: download failed 2 times \(last: "
                                        r"ReadTimeoutError"):
        store.path(ShardInfo("train-000000.tar", 1000, "0" * 64, 2))
    assert len(connections) == 2
    listener.close()


def test_class_discovery_reads_the_same_masks_from_shards_as_from_the_folder(shards):
    root, out = shards
    from_folder, from_shards = load_config(None).data, load_config(None).data
    apply_discovery(from_folder, open_index(str(root), "train"))
    apply_discovery(from_shards, open_index(str(out / "shards.json"), "train"))
    assert from_shards.classes == from_folder.classes == ["class_0", "class_1", "class_2"]


# -- faults -------------------------------------------------------------------------------------------------------------

def load_first(index, i=0):
    return SegmentationDataset(index, MaskDecoder(3, 255)).load(i)


def test_truncated_or_rewritten_local_shard_is_named(shards):
    _, out = shards
    index = open_index(str(out / "shards.json"), "train")
    shard = out / "train-000000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[:-1000])
    with pytest.raises(DataError, match=r"train-000000.tar is \d+ bytes but shards.json lists \d+: the shard is trunc"):
        load_first(index)
    shard.write_bytes(data[512:] + bytes(512))  # same size, members moved: the offsets point elsewhere
    with pytest.raises(DataError, match=r"train-000000.tar: img000.jpg: the shard holds another member"):
        load_first(open_index(str(out / "shards.json"), "train"))
    corrupt = bytearray(data)
    offset = json.loads((out / "shards.json").read_text())["splits"]["train"]["shards"][0]["members"][0][2]
    corrupt[offset + 2: offset + 400] = bytes(398)  # the image's bytes damaged in place
    shard.write_bytes(bytes(corrupt))
    with pytest.raises(DataError, match=r"train-000000.tar: img000.jpg: cannot decode the image"):
        load_first(open_index(str(out / "shards.json"), "train"))


def remote_index(url: str, cache: Path, limit="1MB", window=1, **store_args):
    index = open_split(f"{url}/shards.json", "train", str(cache), limit, window)
    index.store = ShardStore(index.store.location, str(cache), index.store.limit, **store_args)
    return index


def test_missing_shard_404_is_named_at_once(shards, tmp_path):
    _, out = shards
    (out / "train-000001.tar").unlink()
    with SlowServer(out) as server:
        index = remote_index(server.url, tmp_path / "cache")
        load_first(index)  # shard 0 is there
        with pytest.raises(DataError, match=rf"{server.url}/train-000001.tar does not exist on the server \(404"):
            load_first(index, int(np.flatnonzero(index.shard_of == 1)[0]))
        assert server.requests["train-000001.tar"] == 1  # not retried
    with pytest.raises(DataError, match=r"shards.json does not exist"):
        open_index(str(tmp_path / "nowhere" / "shards.json"), "train")


def test_checksum_mismatch_is_retried_then_named_and_nothing_cached(shards, tmp_path):
    _, out = shards
    shard = out / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # same size, other content (the end-of-archive padding)
    shard.write_bytes(bytes(data))
    with SlowServer(out) as server:
        index = remote_index(server.url, tmp_path / "cache", attempts=2)
        with pytest.raises(DataError, match=r"train-000000.tar: download failed 2 times \(last: ChecksumError: "
                                            r"checksum mismatch"):
            load_first(index)
        assert server.requests["train-000000.tar"] == 2
    assert [p.suffix for p in (tmp_path / "cache" / "shards").glob("*.tar*")] == [".lock"]  # no shard, no partial


def test_unreachable_server_and_stalled_download_end_with_one_error(shards, tmp_path, free_port):
    _, out = shards
    with SlowServer(out, stall=("train-000000.tar",)) as server:
        index = remote_index(server.url, tmp_path / "cache", timeout_s=0.3, attempts=2)
        with pytest.raises(DataError, match=r"train-000000.tar: download failed 2 times \(last: timed out"):
            load_first(index)
        assert server.requests["train-000000.tar"] == 2
    index.store = ShardStore(f"http://127.0.0.1:{free_port}/shards.json", str(tmp_path / "cache"), 10 ** 6,
                             timeout_s=0.3, attempts=2)
    with pytest.raises(DataError, match=rf"127.0.0.1:{free_port}/train-000000.tar: download failed 2 times "
                                        r"\(last: ClientConnectorError"):
        load_first(index)


def test_full_cache_disk_and_tiny_cache_limit_are_named(shards, tmp_path, monkeypatch):
    _, out = shards
    with SlowServer(out) as server:
        with pytest.raises(DataError, match=r"data.cache_limit=10 bytes cannot hold two shuffle windows"):
            remote_index(server.url, tmp_path / "cache", limit="10B")
        index = remote_index(server.url, tmp_path / "cache", limit="1MB")
        index.store.limit = 100
        with pytest.raises(DataError, match=r"train-000000.tar is \d+ bytes, more than data.cache_limit=100 bytes"):
            load_first(index)

        def no_space(fd, offset, size):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "posix_fallocate", no_space)
        index.store.limit = 10 ** 6
        with pytest.raises(DataError, match=r"no space left on the disk of the shard cache .* while caching "
                                            rf"{server.url}/train-000000.tar"):
            load_first(index)
    assert not list((tmp_path / "cache" / "shards").glob("*partial*"))


def test_cache_evicts_the_least_recently_used_shards_beyond_its_limit(shards, tmp_path):
    _, out = shards
    sizes = [e["bytes"] for e in json.loads((out / "shards.json").read_text())["splits"]["train"]["shards"]]
    with SlowServer(out) as server:
        index = remote_index(server.url, tmp_path / "cache")
        index.store.limit = sizes[0] + sizes[1] + sizes[2] - 1  # room for two shards, not three
        first = lambda k: int(np.flatnonzero(index.shard_of == k)[0])  # noqa: E731
        for step, k in enumerate((0, 1, 0, 2)):  # shard 0 used again after 1: 1 is the least recently used then
            index._files.clear()  # as a new process would
            load_first(index, first(k))
            os.utime(next((tmp_path / "cache" / "shards").glob(f"*-train-00000{k}.tar")), (1e9 + step * 10,) * 2)
    cached = sorted(p.name.split("-", 1)[1] for p in (tmp_path / "cache" / "shards").glob("*.tar"))
    assert cached == ["train-000000.tar", "train-000002.tar"]


def _read_all(url, cache, queue):
    index = remote_index(url, Path(cache))
    queue.put([load_first(index, i)[1].sum().item() for i in range(len(index))])


def test_processes_sharing_a_cache_download_each_shard_once(shards, tmp_path):
    _, out = shards
    with SlowServer(out, delay_s=0.05) as server:
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_read_all, args=(server.url, tmp_path / "cache", queue)) for _ in range(3)]
        for p in procs:
            p.start()
        results = [queue.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=10)
        assert all(r == results[0] for r in results) and len(results[0]) == 8
        assert all(server.requests[f"train-00000{k}.tar"] == 1 for k in range(3)), server.requests


def test_missing_fsspec_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "fsspec", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(DataError, match=r"https://example.org/shards.json: reading remote shards needs a package "
                                        r"that is not installed .*pip install 'segpipe\[shards\]'"):
        open_index("https://example.org/shards.json", "train")


def test_cache_limit_is_a_size():
    assert load_config(None, ["data.cache_limit=1.5GiB"]).data.cache_limit == "1.5GiB"
    with pytest.raises(ConfigError, match="data.cache_limit='lots' is not allowed; it must be a size above 0"):
        load_config(None, ["data.cache_limit=lots"])
