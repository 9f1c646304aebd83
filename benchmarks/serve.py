"""Load test of serve.py on 127.0.0.1: requests/s and latency percentiles, batching on and off, and offline speed.

    nice python benchmarks/serve.py [--requests 96] [--concurrency 1 4 16] [--threads 1] [--data-root DIR]

The model is a randomly initialised LR-ASPP MobileNetV3-large with 11 classes (CamVid's), written as a train.py
checkpoint to a temporary folder: speed does not depend on the weights. The images are the first --images CamVid
valid images (480x360 JPEGs) when --data-root (default ../shared/data/camvid) exists, else random 480x360 JPEGs.
For --max-batch 8 (batching on) and 1 (off), one serve.py process each (one worker, --max-wait-ms 10, --threads
torch threads) is started; for each concurrency C, C client threads send --requests POSTs in all, each on its own
connection, cycling through the images. The rows are measured in --rounds interleaved rounds (each round sends every
row a share of its requests and predicts every image offline once), so a change of load on a shared machine
affects every row alike. Latency runs from sending a request to having read the whole answer (the mask PNG).
"images/forward" is the mean batch size the service recorded in /metrics. The "offline" row is infer.py's work
without HTTP or files: segpipe.data.read_image, Predictor.predict_batch at infer.py's default --batch-size 4, and
the mask PNG. The clients share the machine's cores with the service, as they would on one host.
--threads is 1 by default: on a machine shared with other work, torch's threads (one per core) spend much of
their time waiting for each other, and the rows would measure the neighbours; --threads 0 gives torch's default.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.hardware import describe  # noqa: E402
from segpipe import service_client  # noqa: E402
from segpipe.checkpoint import make_checkpoint, save_checkpoint  # noqa: E402
from segpipe.data import read_image  # noqa: E402
from segpipe.models import build_model  # noqa: E402
from segpipe.predict import Predictor  # noqa: E402
from segpipe.service_io import mask_png  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL, NUM_CLASSES, HEIGHT, WIDTH = "lraspp_mobilenet_v3_large", 11, 360, 480


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "camvid"))
    parser.add_argument("--images", type=int, default=16, help="distinct images the requests cycle through")
    parser.add_argument("--requests", type=int, default=96, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-batch", type=int, nargs="+", default=[8, 1], help="serve.py --max-batch per run")
    parser.add_argument("--rounds", type=int, default=2, help="the requests of a row are sent in this many rounds, "
                                                               "interleaved with the other rows'")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the service and of the offline "
                                                                "row (0: torch's default, one per core)")
    parser.add_argument("--port", type=int, default=8765, help="the first service's port; the next ones follow")
    return parser.parse_args()


def write_checkpoint(path: Path) -> Path:
    """A random-init checkpoint as train.py writes it."""
    torch.manual_seed(0)
    model = build_model(MODEL, NUM_CLASSES)
    save_checkpoint(make_checkpoint(model.state_dict(), {
        "model_name": MODEL, "model_options": {}, "num_classes": NUM_CLASSES, "palette": None,
        "classes": [f"class_{i}" for i in range(NUM_CLASSES)], "ignore_index": NUM_CLASSES,
        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "eval_size": None, "config": {}}), path)
    return path


def image_files(data_root: str, count: int, folder: Path) -> tuple[list[Path], str]:
    """count image files, and where they come from."""
    valid = Path(data_root) / "valid"
    if valid.is_dir():
        files = sorted(p for p in valid.glob("*.jpg"))[:count]
        if files:
            return files, f"{len(files)} CamVid valid images ({valid})"
    rng = np.random.default_rng(0)
    files = []
    for i in range(count):
        files.append(folder / f"random{i}.jpg")
        Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(files[-1], quality=90)
    return files, f"{count} random {WIDTH}x{HEIGHT} JPEGs (no CamVid at {data_root})"


def start_service(checkpoint: Path, port: int, max_batch: int, threads: int, log: Path) -> subprocess.Popen:
    """serve.py in the background, once /readyz answers 200."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "serve.py"), "--checkpoint", str(checkpoint),
                                 "--port", str(port), "--device", "cpu", "--max-batch", str(max_batch),
                                 "--max-queue", "256", "--log-level", "warning"], stdout=out,
                                stderr=subprocess.STDOUT, cwd=REPO, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if service_client.request(port, "GET", "/readyz", timeout=5)[0] == 200:
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    sys.exit(f"serve.py did not become ready:\n{log.read_text()}")


def batch_totals(port: int) -> tuple[float, float]:
    """(images, forward passes) the service has recorded so far."""
    from prometheus_client.parser import text_string_to_metric_families
    text = service_client.request(port, "GET", "/metrics")[2].decode()
    values = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
              if s.name in ("segpipe_batch_size_sum", "segpipe_batch_size_count")}
    return values.get("segpipe_batch_size_sum", 0.0), values.get("segpipe_batch_size_count", 0.0)


def load(port: int, payloads: list[bytes], requests: int, concurrency: int) -> tuple[float, list[float]]:
    """Send requests POSTs from concurrency threads: (wall seconds, latency of each request in seconds)."""
    latencies: list[float] = []
    failures: list[str] = []
    counter = iter(range(requests))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            tic = time.perf_counter()
            status, _, body = service_client.predict(port, payloads[i % len(payloads)])
            elapsed = time.perf_counter() - tic
            with lock:
                (latencies if status == 200 else failures).append(elapsed if status == 200 else f"{status} {body[:80]}")

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    tic = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - tic
    if failures:
        sys.exit(f"{len(failures)} request(s) failed, e.g. {failures[0]}")
    return wall, latencies


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of values, linear between order statistics."""
    return float(np.percentile(values, q))


class Offline:
    """infer.py's steps in this process: decode, predict_batch at batch size 4, mask PNG."""

    def __init__(self, checkpoint: Path, files: list[Path]):
        self.predictor, self.files = Predictor.from_file(checkpoint, "cpu", batch_size=4), files
        self.predictor.predict_batch([read_image(str(files[0]))[0]])  # warm-up
        self.images, self.seconds = 0, 0.0

    def run(self) -> None:
        """Predict every file once, adding to the totals."""
        tic = time.perf_counter()
        for start in range(0, len(self.files), 4):
            images = [read_image(str(path))[0] for path in self.files[start:start + 4]]
            for pred in self.predictor.predict_batch(images):
                mask_png(pred, self.predictor.palette, self.predictor.num_classes)
        self.seconds += time.perf_counter() - tic
        self.images += len(self.files)


def mode_name(max_batch: int) -> str:
    return f"serve.py --max-batch {max_batch}" + (" (batching off)" if max_batch == 1 else "")


def main() -> int:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(describe(), flush=True)
    with tempfile.TemporaryDirectory(prefix="segpipe-serve-bench-") as tmp:
        folder = Path(tmp)
        checkpoint = write_checkpoint(folder / "random.pt")
        files, source = image_files(args.data_root, args.images, folder)
        payloads = [path.read_bytes() for path in files]
        print(f"# {MODEL}, {NUM_CLASSES} classes, random init; {source}; {args.requests} requests per row in "
              f"{args.rounds} interleaved rounds; {args.threads or torch.get_num_threads()} torch thread(s) per "
              f"process", flush=True)
        ports = {max_batch: args.port + i for i, max_batch in enumerate(args.max_batch)}
        procs = [start_service(checkpoint, port, max_batch, args.threads, folder / f"serve{max_batch}.log")
                 for max_batch, port in ports.items()]
        # rows[(max_batch, concurrency)] = [wall seconds, latencies, images, forward passes]
        rows = {(b, c): [0.0, [], 0.0, 0.0] for b in args.max_batch for c in args.concurrency}
        offline = Offline(checkpoint, files)
        try:
            for port in ports.values():
                load(port, payloads, 2 * max(args.concurrency), max(args.concurrency))  # warm-up, untimed
            per_round = -(-args.requests // args.rounds)
            for r in range(args.rounds):  # interleaved: a change of load on a shared machine hits every row alike
                for concurrency in args.concurrency:
                    for max_batch, port in ports.items():
                        before = batch_totals(port)
                        wall, latencies = load(port, payloads, per_round, concurrency)
                        row = rows[max_batch, concurrency]
                        row[0] += wall
                        row[1] += latencies
                        row[2:] = [t + a - b for t, a, b in zip(row[2:], batch_totals(port), before)]
                offline.run()
                print(f"  round {r + 1}/{args.rounds} done", flush=True)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=120)
    header = ("mode", "concurrency", "requests/s", "p50 ms", "p95 ms", "p99 ms", "images/forward")
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for (max_batch, concurrency), (wall, latencies, images, passes) in rows.items():
        cells = (mode_name(max_batch), str(concurrency), f"{len(latencies) / wall:.1f}",
                 *(f"{1000 * percentile(latencies, q):.0f}" for q in (50, 95, 99)), f"{images / max(passes, 1):.1f}")
        print("| " + " | ".join(cells) + " |")
    print(f"| offline: infer.py's decode + predict_batch + mask PNG, one process | - | "
          f"{offline.images / offline.seconds:.1f} images/s | - | - | - | 4 |")
    print(describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
