"""A minimal client of the prediction service (standard library only): what the tests and benchmarks/serve.py send."""
from __future__ import annotations

import http.client
import json
import secrets


def form_body(data: bytes, filename: str = "image.jpg") -> tuple[bytes, str]:
    """A multipart/form-data body holding data as the field "file", and its Content-Type."""
    boundary = secrets.token_hex(16)
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            host: str = "127.0.0.1", timeout: float = 60) -> tuple[int, dict, bytes]:
    """One HTTP request on a new connection: (status, headers with lower-case names, body)."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def predict(port: int, data: bytes, filename: str = "image.jpg", format: str = "png", host: str = "127.0.0.1",
            timeout: float = 60) -> tuple[int, dict, bytes]:
    """POST data to /predict as infer.py's users would with curl -F file=@image.jpg."""
    body, content_type = form_body(data, filename)
    path = "/predict" if format == "png" else f"/predict?format={format}"
    return request(port, "POST", path, body, {"Content-Type": content_type}, host, timeout)


def get_json(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, dict]:
    """GET path and decode its JSON answer."""
    status, _, body = request(port, "GET", path, host=host)
    return status, json.loads(body)
