"""Serve predictions over HTTP: `python serve.py [--checkpoint runs/X/best.pt] [--port 8000] [--workers N]`.

POST an image to /predict (curl -F file=@street.jpg http://127.0.0.1:8000/predict -o street_mask.png) and get
the class-index PNG infer.py writes as NAME_mask.png; ?format=json gives the class shares and the mask. Also
/healthz, /readyz, /metadata and /metrics (Prometheus); see segpipe/service.py. Concurrent requests with images
of the same size share one forward pass (up to --max-batch, waiting at most --max-wait-ms for company).
Without --checkpoint it serves the best.pt of the newest finished training run in runs/, as infer.py does.
SIGTERM (or Ctrl-C) stops taking connections, finishes the requests already in, and exits 0.
Needs the serve extra: pip install "segpipe[serve]" (or pip install fastapi uvicorn prometheus-client python-multipart).
"""
import argparse
import os
import signal
import sys
import tempfile

SERVE_PACKAGES = "fastapi uvicorn prometheus-client python-multipart"


def get_args_parser() -> argparse.ArgumentParser:
    """serve.py's command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a best.pt/last.pt of train.py or a compressed artefact "
                                             "(default: the best.pt of the newest finished run in runs/)")
    parser.add_argument("--host", default=os.environ.get("SEGPIPE_HOST", "127.0.0.1"),
                        help="address to listen on; 0.0.0.0 for every interface (default: $SEGPIPE_HOST, which "
                             "the Docker image sets to 0.0.0.0, else 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="processes, each with its own copy of the model")
    parser.add_argument("--max-batch", type=int, default=8, help="most images per forward pass (1: no batching)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0,
                        help="longest a request waits for others to share its forward pass")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests waiting for the model, per worker; more get 503 with Retry-After")
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest image file accepted (413 above)")
    parser.add_argument("--max-megapixels", type=float, default=50.0,
                        help="largest image accepted, in millions of pixels (Pillow's decompression-bomb guard)")
    parser.add_argument("--timeout-s", type=float, default=30.0,
                        help="answer 504 when a decoded image has no prediction after this long")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if present)")
    parser.add_argument("--trust-artefact", action="store_true",
                        help="allow an int8 .pt2 --checkpoint: loading one can run code stored in it, so use only "
                             "files you made with `python -m segpipe.compress quantize`")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the first option out of range."""
    for name in ("workers", "max_batch", "max_queue"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be 1 or more, got {getattr(args, name)}")
    for name in ("max_upload_mb", "max_megapixels", "timeout_s"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 <= args.max_wait_ms <= 60_000:
        raise ValueError(f"--max-wait-ms must be between 0 and 60000, got {args.max_wait_ms}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}")


def import_server():
    """uvicorn and the app module, or SystemExit naming the pip command when the serve extra is missing."""
    try:
        import uvicorn

        from segpipe import service
    except ModuleNotFoundError as e:
        raise SystemExit(f"error: serve.py needs {e.name}, which is not installed: pip install \"segpipe[serve]\" "
                         f"(or pip install {SERVE_PACKAGES})") from None
    return uvicorn, service


def run(args: argparse.Namespace, options, predictor) -> None:
    """Serve until SIGTERM/SIGINT; one process with predictor, or args.workers processes that each load their own."""
    uvicorn, service = import_server()
    common = dict(host=args.host, port=args.port, log_level=args.log_level,
                  timeout_graceful_shutdown=int(args.timeout_s) + 5)  # a queued request gets its 504 before that
    # uvicorn re-raises the signal it drained on, to die by it; this handler turns that into a clean exit 0.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        if args.workers == 1:
            uvicorn.run(service.create_app(options, predictor), **common)
        else:
            run_workers(uvicorn, service, args.workers, options, common)
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_workers(uvicorn, service, workers: int, options, common: dict) -> None:
    """uvicorn's worker processes, each building the app from the options in its environment."""
    service.options_to_environment(options)
    # Each worker gets its share of the cores: N processes each running all cores' threads slow each other down.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    own_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    with tempfile.TemporaryDirectory(prefix="segpipe-metrics-") as metrics_dir:
        if own_dir:  # /metrics then adds up all workers' values (segpipe.service_metrics)
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        try:
            # uvicorn restarts a worker that does not answer its ping within timeout_worker_healthcheck (default
            # 5 s): importing torch on a busy machine can take longer, which would restart workers forever.
            uvicorn.run("segpipe.service:app_from_environment", factory=True, workers=workers,
                        timeout_worker_healthcheck=60, **common)
        finally:
            if own_dir:
                del os.environ["PROMETHEUS_MULTIPROC_DIR"]


def main(argv: list[str] | None = None) -> int:
    """Check the options and the checkpoint, then serve; 0 after a clean shutdown."""
    args = get_args_parser().parse_args(argv)
    try:
        check_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _, service = import_server()  # before the slow part: a missing package is reported at once
    from segpipe.checkpoint import CheckpointError
    from segpipe.predict import open_predictor
    try:  # loaded here so that a wrong --checkpoint is one line and exit 1; worker processes load their own copy
        predictor, checkpoint, picked = open_predictor(args.checkpoint, args.device, batch_size=args.max_batch,
                                                       trust_artefact=args.trust_artefact)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if picked:
        print(f"using {checkpoint}, from the newest finished run (--checkpoint chooses another)")
    if args.workers > 1:
        predictor = None  # it has shown the checkpoint loads; each worker process loads its own copy
    options = service.ServiceOptions(str(checkpoint), args.device, args.trust_artefact, args.max_batch,
                                     args.max_wait_ms, args.max_queue, args.max_upload_mb, args.timeout_s,
                                     args.max_megapixels)
    run(args, options, predictor)
    return 0


if __name__ == "__main__":
    sys.exit(main())
