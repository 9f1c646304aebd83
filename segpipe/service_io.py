"""The prediction service's request and answer bodies: a size-bounded upload, its image, the mask PNG."""
from __future__ import annotations

import io
import logging

import torch
from fastapi import HTTPException, Request
from PIL import Image
from starlette.datastructures import UploadFile

from segpipe.data import DataError, read_image
from segpipe.visualize import colorize

FORM_SLACK = 64 * 1024  # multipart boundaries and part headers on top of the image itself
log = logging.getLogger("uvicorn.error")  # formatted and shown like uvicorn's own messages


class UploadTooLarge(Exception):
    """The request body passed the upload limit while it was being read."""


async def read_upload(request: Request, max_upload_mb: float) -> tuple[bytes, str]:
    """The bytes and a label of the form's "file" field; 413 as soon as the body passes the limit, 400 without one."""
    file_limit = int(max_upload_mb * 2 ** 20)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > file_limit + FORM_SLACK:
        raise too_large(max_upload_mb)
    counted = Request(request.scope, limited(request.receive, file_limit + FORM_SLACK))
    try:
        form = await counted.form(max_files=1, max_fields=8)
    except UploadTooLarge:
        raise too_large(max_upload_mb) from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise HTTPException(400, 'no file in the form field "file"; send the image as multipart form data, '
                                     'e.g. curl -F file=@image.jpg http://HOST:PORT/predict')
        data = await upload.read()
    finally:
        await form.close()
    name = f"upload {(upload.filename or 'file')[:200]!r}"
    if len(data) > file_limit:
        raise too_large(max_upload_mb)
    if not data:
        raise HTTPException(400, f"{name} is empty (0 bytes); send an image file")
    return data, name


def limited(receive, limit: int):
    """An ASGI receive that raises UploadTooLarge once more than limit body bytes have arrived."""
    seen = 0

    async def receive_counted():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise UploadTooLarge
        return message
    return receive_counted


def too_large(max_mb: float) -> HTTPException:
    """413 for a body over the upload limit; the connection closes rather than read the rest of the body."""
    return HTTPException(413, f"the upload is larger than {max_mb:g} MB (--max-upload-mb); send a smaller image",
                         headers={"Connection": "close"})


class NamedUpload(io.BytesIO):
    """Uploaded bytes that Pillow's and read_image's messages name as the client's file, not a memory address."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.label = name

    def __str__(self) -> str:
        return self.label

    __repr__ = __str__


def decode_upload(data: bytes, name: str) -> Image.Image:
    """The uploaded image as infer.py decodes a file (segpipe.data.read_image); HTTPException 400 if it is none."""
    try:
        return read_image(NamedUpload(data, name))[0]
    except DataError as e:
        # read_image's message advises on a data folder; a client needs Pillow's reason (kept as the context).
        cause = e.__context__ or e
    except Image.DecompressionBombWarning as e:  # an error here: create_app's warnings filter
        cause = e
    except Exception as e:  # noqa: BLE001 - Pillow's decoders can fail in other ways on crafted files
        log.warning("segpipe: %s: unexpected decoder error %s: %s", name, type(e).__name__, e)
        cause = e
    if isinstance(cause, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        raise HTTPException(400, f"{name}: {str(cause).rstrip('.')}; send a smaller image")
    raise HTTPException(400, f"{name}: cannot decode the image ({cause}); send an image file such as a JPEG or PNG")


def mask_png(pred: torch.Tensor, palette: list, num_classes: int) -> bytes:
    """The class map as infer.py's NAME_mask.png: a palette PNG whose pixel values are the class indices."""
    labels = pred.numpy().astype("uint8" if num_classes <= 256 else "int32")
    buffer = io.BytesIO()
    colorize(labels, palette).save(buffer, format="PNG")
    return buffer.getvalue()
