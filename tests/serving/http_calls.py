"""Plain HTTP calls for the HTTP API tests (stdlib ``urllib``: no client library between the test and
the wire), and images as data URLs."""

from __future__ import annotations

import base64
import io
import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Answer:
    status: int
    body: Any  # the JSON body (or the raw text when it is not JSON)
    headers: dict[str, str]

    @property
    def message(self) -> str:
        return self.body["error"]["message"]


def call(url: str, body: Any = None, *, method: str | None = None, headers: dict[str, str] | None = None,
         raw: bytes | None = None, content_type: str | None = "application/json",
         context: ssl.SSLContext | None = None, timeout: float = 60.0) -> Answer:
    """One request: ``body`` sent as JSON (or ``raw`` bytes as they are); any status is returned."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"))
    if content_type is not None and data is not None:
        request.add_header("Content-Type", content_type)
    for k, v in (headers or {}).items():
        request.add_header(k, v)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as r:
            status, text, hdrs = r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        status, text, hdrs = e.code, e.read(), dict(e.headers)
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = text.decode(errors="replace")
    return Answer(status, parsed, hdrs)


def png(image: np.ndarray) -> bytes:
    """uint8 ``[H, W, 1|3]`` as PNG file bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def data_url(file_bytes: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(file_bytes).decode()}"
