"""serve.py: the HTTP prediction service, run as a real process on 127.0.0.1 with a tiny random-init LR-ASPP."""
import asyncio
import base64
import io
import json
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("python_multipart")
parser = pytest.importorskip("prometheus_client.parser")

from conftest import REPO, run_env  # noqa: E402
from segpipe import service_client as client  # noqa: E402
from segpipe.predict import Predictor, class_shares  # noqa: E402
from test_predict import tiny_checkpoint  # noqa: E402

H, W = 48, 64
NUM_CLASSES = 5


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_images(n: int, seed: int, size=(H, W)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


def jpeg(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height grey pixels but holds almost no data: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


class Server:
    """serve.py in a subprocess, its log in a file (a pipe nobody reads would stall it)."""

    def __init__(self, checkpoint: Path, log: Path, *options: str):
        self.port, self.log = unused_port(), log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(REPO / "serve.py"), "--checkpoint", str(checkpoint), "--port", str(self.port),
                 "--device", "cpu", *options], stdout=out, stderr=subprocess.STDOUT, env=run_env(), cwd=REPO)

    def ready(self) -> "Server":
        """Wait until /readyz answers 200 (a generous bound: four processes import torch at once)."""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"serve.py exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if client.request(self.port, "GET", "/readyz", timeout=5)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        pytest.fail(f"serve.py not ready after 300 s:\n{self.log.read_text()}")

    def metrics(self) -> dict:
        """{(name, sorted label items): value} of every sample on /metrics."""
        status, _, body = client.request(self.port, "GET", "/metrics")
        assert status == 200
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in parser.text_string_to_metric_families(body.decode()) for s in family.samples}

    def wait_for_queue(self, depth: int) -> None:
        """Until depth requests wait for a forward pass (the requests themselves run in other threads)."""
        deadline = time.monotonic() + 60
        while self.metrics().get(("segpipe_queue_depth", ())) != depth:
            assert time.monotonic() < deadline, f"the queue never held {depth} request(s)"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serve")
    return tiny_checkpoint(folder / "tiny.pt", NUM_CLASSES, images=random_images(4, seed=0))


@pytest.fixture(scope="module")
def started(checkpoint):
    """The four services and the infer.py run the tests compare with, all started at once: their start-up
    (importing torch) is most of this file's time and overlaps this way."""
    folder = checkpoint.parent
    rng = np.random.default_rng(1)
    turned = folder / "turned.jpg"  # stored 64x48 with EXIF "rotate 90": decoded upright as 48 wide, 64 high
    exif = Image.Exif()
    exif[0x0112] = 6
    turned.write_bytes(jpeg(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), exif=exif))
    grey16 = folder / "grey16.png"  # 16-bit greyscale: read_image scales it to 8 bits
    Image.fromarray(rng.integers(0, 65536, (40, 56), dtype=np.uint16)).save(grey16)
    infer = subprocess.Popen([sys.executable, "infer.py", str(turned), str(grey16), "--checkpoint", str(checkpoint),
                              "--out", str(folder / "out"), "--device", "cpu", "--workers", "0"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=run_env(), cwd=REPO)
    servers = {
        # batching that waits long enough (300 ms) for 16 concurrent requests to meet on a busy machine
        "main": Server(checkpoint, folder / "serve.log", "--max-batch", "8", "--max-wait-ms", "300",
                       "--max-upload-mb", "1"),
        # one request can wait 4 s for company while holding the only queue place, but times out after 1 s
        "limits": Server(checkpoint, folder / "serve-limits.log", "--max-batch", "2", "--max-queue", "1",
                         "--max-wait-ms", "4000", "--timeout-s", "1"),
        # queued requests wait 3 s for company: time to send SIGTERM while they wait
        "term": Server(checkpoint, folder / "serve-term.log", "--max-batch", "4", "--max-wait-ms", "3000"),
        "workers": Server(checkpoint, folder / "serve-workers.log", "--workers", "2"),
    }
    yield {"infer": infer, "inputs": [turned, grey16], "out": folder / "out", **servers}
    for process in [infer] + [s.proc for s in servers.values()]:
        if process.poll() is None:
            process.terminate()  # SIGTERM, so that --workers 2 also ends its worker processes
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def server(started) -> Server:
    return started["main"].ready()


def decode_mask(png: bytes) -> tuple[np.ndarray, list]:
    image = Image.open(io.BytesIO(png))
    assert image.mode == "P"
    return np.array(image), image.getpalette()


def test_health_readiness_and_metadata(server, checkpoint):
    assert client.get_json(server.port, "/healthz") == (200, {"status": "ready"})
    assert client.get_json(server.port, "/readyz") == (200, {"ready": True, "status": "ready"})
    status, meta = client.get_json(server.port, "/metadata")
    predictor = Predictor.from_file(checkpoint, "cpu")
    assert status == 200
    assert meta["model_name"] == "lraspp_mobilenet_v3_large" and meta["classes"] == predictor.classes
    assert meta["palette"] == [list(c) for c in predictor.palette] and meta["num_classes"] == NUM_CLASSES
    assert meta["mean"] == predictor.meta["mean"] and meta["std"] == predictor.meta["std"]
    assert meta["eval_size"] is None and meta["max_batch"] == 8


def test_readyz_is_503_until_the_model_has_run():
    from segpipe.service import Service, ServiceOptions
    service = Service(ServiceOptions(checkpoint="unused.pt"))  # its lifespan (load, warm-up) has not run
    response = asyncio.run(service.readyz())
    assert response.status_code == 503 and json.loads(response.body)["ready"] is False
    assert response.headers["retry-after"] == "1"


def test_mask_equals_infer_py(server, started):
    """infer.py runs as a process: the comparison is with the NAME_mask.png files users get, written by infer.py's
    own decoding, prediction and colouring path (a shared in-process Predictor would skip its file handling).
    The inputs are an EXIF-rotated JPEG and a 16-bit greyscale PNG, which both decode paths must turn alike."""
    output, _ = started["infer"].communicate(timeout=300)
    assert started["infer"].returncode == 0, output
    for path in started["inputs"]:
        status, headers, body = client.predict(server.port, path.read_bytes(), path.name)
        assert status == 200 and headers["content-type"] == "image/png"
        served, served_palette = decode_mask(body)
        written, written_palette = decode_mask((started["out"] / f"{path.stem}_mask.png").read_bytes())
        upright = (W, H) if path.suffix == ".jpg" else Image.open(path).size[::-1]
        assert served.shape == written.shape == upright
        assert np.array_equal(served, written) and served_palette == written_palette
        assert len(np.unique(served)) > 1  # a model answering one class everywhere would prove nothing


def test_json_gives_class_shares_and_the_same_mask(server):
    data = jpeg(random_images(1, seed=2)[0])
    status, _, png = client.predict(server.port, data)
    status_json, headers, body = client.predict(server.port, data, format="json")
    assert status == status_json == 200 and headers["content-type"] == "application/json"
    answer = json.loads(body)
    mask = decode_mask(base64.b64decode(answer["mask_png"]))[0]
    assert np.array_equal(mask, decode_mask(png)[0])
    assert (answer["width"], answer["height"]) == (W, H) and len(answer["classes"]) == NUM_CLASSES
    import torch
    assert answer["shares"] == pytest.approx(class_shares(torch.from_numpy(mask), NUM_CLASSES))


def test_concurrent_requests_are_batched_and_each_gets_its_own_mask(server, checkpoint):
    images = random_images(16, seed=3)
    files = [jpeg(image) for image in images]
    before = server.metrics()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda data: client.predict(server.port, data), files))
    assert [status for status, _, _ in answers] == [200] * 16
    predictor = Predictor.from_file(checkpoint, "cpu")  # each image alone, as the reference
    for (_, _, body), data in zip(answers, files):
        expected = predictor.predict(Image.open(io.BytesIO(data))).numpy()
        # batched convolutions may round a boundary pixel differently; another request's mask agrees ~1/5 only
        assert (decode_mask(body)[0] == expected).mean() > 0.98
    after = server.metrics()

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)
    assert delta("segpipe_requests_total", endpoint="/predict", status="200") == 16
    batches, batched_alone = delta("segpipe_batch_size_count"), delta("segpipe_batch_size_bucket", le="1.0")
    assert batches - batched_alone > 0, "no forward pass held more than one image"
    assert delta("segpipe_batch_size_sum") == 16  # every image went through the model exactly once


def send_raw(port: int, head: str, chunks=()) -> bytes:
    """Send a request head and body chunks over a socket, then read the answer until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head.encode())
        for chunk in chunks:
            s.sendall(chunk)
        answer = b""
        while data := s.recv(65536):
            answer += data
    return answer


@pytest.mark.parametrize("how", ["declared", "streamed"])
def test_oversize_upload_is_413_before_it_is_read(server, how):
    """--max-upload-mb 1: a Content-Length over it is refused before any body byte is read; a chunked body without
    one is cut off as soon as it passes the limit (the client stops at the chunk that crosses it)."""
    if how == "declared":
        answer = send_raw(server.port, "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                                       "boundary=b\r\nContent-Length: 50000000\r\n\r\n")
    else:
        piece = b"x" * 65536
        chunks = [b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n\r\n"]
        chunks[0] = f"{len(chunks[0]):x}\r\n".encode() + chunks[0] + b"\r\n"
        # 17 pieces: the last one crosses 1 MiB + the form slack (64 KiB), so the server has read every byte sent
        # when it answers; bytes left unread would make it reset the connection, losing the answer
        chunks += [f"{len(piece):x}\r\n".encode() + piece + b"\r\n"] * 17
        answer = send_raw(server.port, "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                                       "boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n", chunks)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"larger than 1 MB" in answer


@pytest.mark.parametrize("name, data, reason", [
    ("empty.jpg", b"", "is empty"),
    ("garbage.jpg", bytes(range(256)) * 8, "cannot decode the image"),
    ("truncated.jpg", jpeg(random_images(1, seed=4)[0])[:600], "cannot decode the image"),
    ("bomb.png", png_header_only(40000, 40000), "decompression bomb"),  # over twice the limit: Pillow's error
    ("large.png", png_header_only(9000, 9000), "decompression bomb"),  # 81 MP, over --max-megapixels 50
], ids=lambda value: value if isinstance(value, str) and value.endswith((".jpg", ".png")) else "")
def test_bad_upload_is_400_with_the_reason_and_the_service_goes_on(server, name, data, reason):
    status, _, body = client.predict(server.port, data, name)
    assert status == 400
    detail = json.loads(body)["detail"]
    assert reason in detail and name in detail
    assert client.predict(server.port, jpeg(random_images(1, seed=5)[0]))[0] == 200
    assert server.proc.poll() is None


def test_a_form_without_the_file_field_is_400(server):
    status, _, body = client.request(server.port, "POST", "/predict", b"a=1",
                                     {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 400 and "form field" in json.loads(body)["detail"]


def test_no_client_mistake_gave_a_500(server):
    """Run after the hostile tests above (pytest keeps file order): no prediction was answered as a server error
    (/readyz answered 503 while the server warmed up, as it should)."""
    answered = {tuple(dict(key[1]).values()): value for key, value in server.metrics().items()
                if key[0] == "segpipe_requests_total"}
    assert answered[("/predict", "400")] >= 5 and answered[("/predict", "413")] >= 2
    assert [key for key in answered if key[1].startswith("5") and key != ("/readyz", "503")] == []


def test_full_queue_is_503_with_retry_after_and_a_late_answer_504(started):
    """One request waits for company (4 s) while holding the only queue place; the next is turned away at once,
    and the first gets 504 when its --timeout-s (1 s) runs out."""
    server = started["limits"].ready()
    data = jpeg(random_images(1, seed=6)[0])
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.predict, server.port, data)
        server.wait_for_queue(1)
        status, headers, body = client.predict(server.port, data)
        assert status == 503 and headers["retry-after"] == "1" and "--max-queue 1" in json.loads(body)["detail"]
        status, _, body = first.result()
    assert status == 504 and "--timeout-s" in json.loads(body)["detail"]
    assert client.get_json(server.port, "/healthz")[0] == 200


def test_sigterm_finishes_queued_requests_refuses_new_ones_and_exits_0(started):
    """Two requests wait for company; SIGTERM closes the listening socket at once, they still get their masks,
    and the process exits 0."""
    server = started["term"].ready()
    files = [jpeg(image) for image in random_images(2, seed=7)]
    with ThreadPoolExecutor(2) as pool:
        queued = [pool.submit(client.predict, server.port, data) for data in files]
        server.wait_for_queue(2)  # both wait up to 3 s for two more
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while True:  # the listening socket closes while the queued requests are still waiting
            try:
                socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
            except ConnectionRefusedError:
                break
            assert time.monotonic() < deadline, "serve.py still takes connections after SIGTERM"
            time.sleep(0.05)
        refused_while_queued = not any(f.done() for f in queued)
        answers = [f.result() for f in queued]
    assert [status for status, _, _ in answers] == [200, 200]
    assert all(decode_mask(body)[0].shape == (H, W) for _, _, body in answers)
    assert refused_while_queued
    assert server.proc.wait(timeout=60) == 0, server.log.read_text()


def test_two_workers_serve_and_metrics_add_up_over_both(started):
    """--workers 2: two processes share the port, each with its model; /metrics, answered by either, counts all."""
    server = started["workers"].ready()
    files = [jpeg(image) for image in random_images(8, seed=8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda data: client.predict(server.port, data), files))
    assert [status for status, _, _ in answers] == [200] * 8
    for _ in range(4):  # whichever worker answers
        metrics = server.metrics()
        assert metrics[("segpipe_requests_total", (("endpoint", "/predict"), ("status", "200")))] == 8
        assert metrics[("segpipe_batch_size_sum", ())] == 8
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 0, server.log.read_text()


def test_bad_checkpoint_or_option_is_one_line_and_no_server(tmp_path, capsys):
    import serve
    assert serve.main(["--checkpoint", str(tmp_path / "missing.pt")]) == 1
    assert serve.main(["--max-batch", "0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines)
    assert "missing.pt" in lines[0] and "--max-batch" in lines[1]


def test_serve_packages_are_the_same_in_pyproject_requirements_and_dockerfile():
    """The serve extra is written in three places (pip install .[serve], CI's requirements, the image)."""
    import re
    import tomllib
    extra = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve"])
    dev = {line.strip() for line in (REPO / "requirements-dev.txt").read_text().splitlines()}
    docker = set(re.findall(r'"([a-z-]+>=[0-9.]+)"', (REPO / "Dockerfile").read_text()))
    assert len(extra) == 4 and extra <= dev and extra == docker


def test_batcher_never_mixes_keys_or_exceeds_max_batch():
    """In-process: 7 jobs of key "a" and 3 of key "b" queued at once, max_batch 4."""
    from segpipe.service_batcher import Batcher
    seen = []

    def run_batch(items):
        seen.append(list(items))
        return [item.upper() for item in items]

    async def scenario():
        with ThreadPoolExecutor(1) as executor:
            batcher = Batcher(run_batch, executor, max_batch=4, max_wait_s=0.5, max_queue=16)
            batcher.start()
            futures = [batcher.submit(item[0], item) for item in ["a1", "b1", "a2", "a3", "b2", "a4", "a5", "a6",
                                                                   "b3", "a7"]]
            results = await asyncio.gather(*futures)
            await batcher.close()
        return results

    results = asyncio.run(scenario())
    assert results == ["A1", "B1", "A2", "A3", "B2", "A4", "A5", "A6", "B3", "A7"]
    assert all(len(batch) <= 4 and len({item[0] for item in batch}) == 1 for batch in seen)
    assert sorted(map(len, seen)) == [3, 3, 4]  # a1-a4 at once (full), then b1-b3 and a5-a7 at their deadline
