"""The HTTP prediction service of serve.py: a FastAPI app around one Predictor, with dynamic batching.

    POST /predict              multipart form, the image in the field "file" (curl -F file=@street.jpg URL/predict).
                               Answers the class-index PNG that infer.py writes as NAME_mask.png: palette mode,
                               pixel value = class index, the checkpoint's class colours in the palette.
    POST /predict?format=json  {"width", "height", "classes", "shares", "mask_png"}: each class's share of the
                               pixels (segpipe.predict.class_shares, in the order of "classes") and the mask
                               encoded as that same PNG, base64 (decode it with any image library).
    GET /healthz   200 while the process serves (503 once its model failed to load)
    GET /readyz    200 once the model is loaded and has run one forward pass; 503 before
    GET /metadata  model name, classes, palette, ignore_index, eval size, mean/std, batching settings
    GET /metrics   Prometheus text format (segpipe.service_metrics)
Errors are JSON {"detail": "..."}: 400 (empty upload, not an image, decompression bomb, malformed form),
413 (request body over max_upload_mb), 503 with Retry-After (queue full, shutting down, model failed to load or
still loading after timeout_s: a request reaching a worker that warms up waits for it), 504 (no result within
timeout_s of the image being decoded).
Images decode as in training and infer.py (segpipe.data.read_image: EXIF orientation, 16-bit and palette modes),
so a posted image gets the mask infer.py writes for the same file, pixel for pixel, when it is predicted alone;
in a batch, batched convolutions round differently and can flip a few pixels at class boundaries, as infer.py's
own --batch-size does.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

from segpipe.predict import Predictor, class_shares, open_predictor
from segpipe.service_batcher import Batcher, Closed, QueueFull
from segpipe.service_io import decode_upload, log, mask_png, read_upload
from segpipe.service_metrics import Metrics, RequestMetrics

OPTIONS_ENV = "SEGPIPE_SERVE_OPTIONS"  # how serve.py hands the options to uvicorn's worker processes


@dataclass
class ServiceOptions:
    """serve.py's options that the app needs (plain values: they travel to worker processes as JSON)."""
    checkpoint: str
    device: Optional[str] = None
    trust_artefact: bool = False
    max_batch: int = 8
    max_wait_ms: float = 10.0
    max_queue: int = 64
    max_upload_mb: float = 20.0
    timeout_s: float = 30.0
    max_megapixels: float = 50.0


class Service:
    """The model, its batcher and metrics, and the request handlers."""

    def __init__(self, options: ServiceOptions, predictor: Optional[Predictor] = None):
        self.options, self.predictor = options, predictor
        self.state = "loading the model"
        self.started = asyncio.Event()  # set when loading and warm-up end, well or not
        self.metrics = Metrics(options.max_batch)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="segpipe-model")  # one forward pass at a time
        self.batcher: Optional[Batcher] = None

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        """Load and warm up in the background (/healthz answers meanwhile); on shutdown, finish what is queued."""
        self.batcher = Batcher(self._predict_batch, self.executor, self.options.max_batch,
                               self.options.max_wait_ms / 1000, self.options.max_queue,
                               on_batch=self.metrics.batch_size.observe, on_depth=self.metrics.queue_depth.set)
        self.batcher.start()
        starting = asyncio.create_task(self._load_and_warm_up())
        yield
        self.state = "shutting down"
        await self.batcher.close()
        await starting
        self.executor.shutdown(wait=True)
        self.metrics.process_exits()

    async def _load_and_warm_up(self) -> None:
        loop, tic = asyncio.get_running_loop(), time.perf_counter()
        try:
            if self.predictor is None:
                self.predictor = await loop.run_in_executor(self.executor, self._load)
            self.state = "warming up"
            await loop.run_in_executor(self.executor, self._warm_up)
            self.state = "ready"
            log.info("segpipe: %s ready on %s after %.1f s (%s, %d classes)", self.options.checkpoint,
                     self.predictor.device, time.perf_counter() - tic, self.predictor.meta["model_name"],
                     self.predictor.num_classes)
        except Exception as e:  # noqa: BLE001 - a worker that cannot load says why on /healthz and in the log
            self.state = f"failed: {e}"
            log.error("segpipe: cannot serve %s: %s", self.options.checkpoint, e)
        finally:
            self.started.set()

    def _load(self) -> Predictor:
        return open_predictor(self.options.checkpoint, self.options.device, batch_size=self.options.max_batch,
                              trust_artefact=self.options.trust_artefact)[0]

    def _warm_up(self) -> None:
        """One forward pass, so the first client does not pay for lazy initialisation."""
        h, w = self._fixed_input_size() or (256, 256)
        self.predictor.predict(Image.new("RGB", (w, h)))

    def _fixed_input_size(self) -> Optional[tuple[int, int]]:
        size = self.predictor.eval_size
        return (int(size[0]), int(size[1])) if size is not None and len(size) == 2 else None

    def _batch_key(self, image: Image.Image) -> tuple:
        """Images with equal keys have equal model inputs, so they fit in one forward pass."""
        return self._fixed_input_size() or image.size

    def _predict_batch(self, images: list[Image.Image]) -> list[torch.Tensor]:
        return self.predictor.predict_batch(images)

    async def _wait_until_ready(self) -> None:
        """Hold a request that reached a worker still warming up (another may be serving on the same port);
        503 once --timeout-s passes, or at once if the model failed to load."""
        try:
            await asyncio.wait_for(self.started.wait(), self.options.timeout_s)
        except asyncio.TimeoutError:
            pass
        if self.state != "ready":
            raise unavailable(f"the service is {self.state}")

    # -- endpoints ---------------------------------------------------------------------------------------------
    async def predict(self, request: Request, format: Literal["png", "json"] = "png") -> Response:
        """The class-index PNG of the uploaded image, or with ?format=json its class shares and the PNG in base64."""
        await self._wait_until_ready()
        try:
            self.batcher.check_room()  # before reading and decoding an upload that would be refused anyway
        except (QueueFull, Closed) as e:
            raise unavailable(str(e)) from None
        data, name = await read_upload(request, self.options.max_upload_mb)
        image = await run_in_threadpool(decode_upload, data, name)
        try:
            future = self.batcher.submit(self._batch_key(image), image)
        except (QueueFull, Closed) as e:
            raise unavailable(str(e)) from None
        try:
            pred = await asyncio.wait_for(future, self.options.timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(504, f"no prediction within {self.options.timeout_s:g} s (--timeout-s); the "
                                     f"service is overloaded, retry later") from None
        png = await run_in_threadpool(mask_png, pred, self.predictor.palette, self.predictor.num_classes)
        if format == "png":
            return Response(png, media_type="image/png")
        return JSONResponse({"width": image.width, "height": image.height, "classes": self.predictor.classes,
                             "shares": class_shares(pred, self.predictor.num_classes),
                             "mask_png": base64.b64encode(png).decode("ascii")})

    async def healthz(self) -> JSONResponse:
        """200 while the process serves; 503 when its model failed to load (restart it)."""
        failed = self.state.startswith("failed")
        return JSONResponse({"status": self.state}, status_code=503 if failed else 200)

    async def readyz(self) -> JSONResponse:
        """200 once the model is loaded and warmed up, else 503 with the state."""
        ready = self.state == "ready"
        return JSONResponse({"ready": ready, "status": self.state}, status_code=200 if ready else 503,
                            headers=None if ready else {"Retry-After": "1"})

    async def metadata(self) -> dict:
        """What a client needs to read the masks: classes, palette, model, input size, normalisation."""
        if self.predictor is None:
            raise unavailable(f"the service is {self.state}")
        meta = self.predictor.meta
        return {"model_name": meta["model_name"], "checkpoint": os.path.basename(self.options.checkpoint),
                "num_classes": self.predictor.num_classes, "classes": self.predictor.classes,
                "palette": self.predictor.palette, "ignore_index": self.predictor.ignore_index,
                "eval_size": meta.get("eval_size"), "mean": meta["mean"], "std": meta["std"],
                "device": str(self.predictor.device), "max_batch": self.options.max_batch,
                "max_upload_mb": self.options.max_upload_mb}

    async def metrics_text(self) -> Response:
        """All metrics in the Prometheus text format."""
        return Response(self.metrics.exposition(), media_type=self.metrics.content_type)


def create_app(options: ServiceOptions, predictor: Optional[Predictor] = None) -> FastAPI:
    """The FastAPI app serving options.checkpoint (or an already loaded predictor of it).

    Sets this process's Pillow pixel limit to max_megapixels and makes Pillow's decompression-bomb warning an
    error, so an image over the limit is refused (400) instead of decoded."""
    Image.MAX_IMAGE_PIXELS = int(options.max_megapixels * 1e6)
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    service = Service(options, predictor)
    app = FastAPI(title="segpipe", summary="Semantic segmentation of street scenes", lifespan=service.lifespan)
    upload_body = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"], "properties": {"file": {"type": "string", "format": "binary"}}}}}}}
    app.add_api_route("/predict", service.predict, methods=["POST"], response_class=Response,
                      openapi_extra=upload_body)
    app.add_api_route("/healthz", service.healthz, methods=["GET"])
    app.add_api_route("/readyz", service.readyz, methods=["GET"])
    app.add_api_route("/metadata", service.metadata, methods=["GET"])
    app.add_api_route("/metrics", service.metrics_text, methods=["GET"])
    app.add_middleware(RequestMetrics, metrics=service.metrics)
    app.state.service = service
    return app


def app_from_environment() -> FastAPI:
    """create_app with the options serve.py put in SEGPIPE_SERVE_OPTIONS: uvicorn's factory in each worker."""
    return create_app(ServiceOptions(**json.loads(os.environ[OPTIONS_ENV])))


def options_to_environment(options: ServiceOptions) -> None:
    """Put options where app_from_environment (in uvicorn's worker processes) finds them."""
    os.environ[OPTIONS_ENV] = json.dumps(asdict(options))


def unavailable(reason: str) -> HTTPException:
    """503 with Retry-After: the client may try again in a second."""
    return HTTPException(503, f"{reason}; retry later", headers={"Retry-After": "1"})
