"""A Python client of a served memory (the HTTP API of ``index.serve.api``).

    from index.serve.client import Client
    memory = Client("http://127.0.0.1:8000", token="...")        # token: for add and remove only
    answer = memory.classify(images=["cat.jpg"], k=10, rule="distance")
    answer.results[0].decision, answer.results[0].neighbours[0].uri

Answers are the server's own pydantic models (``SearchResponse``, ``ClassifyResponse``, ...), so a
client and the server cannot disagree about a field. A 4xx raises ``RequestRejected`` with the
server's words; a 503 (no shard answered, or Serve shedding load) and a refused connection are
retried with exponential backoff, then raise ``Unavailable``. Reads and searches are retried on
any connection error; an edit only when its request provably never reached the server (the
connection was refused or timed out while connecting), so that a retry never applies it twice.
"""

from __future__ import annotations

import base64
import io
import os
import time
from collections.abc import Sequence
from typing import Any

import fsspec
import numpy as np
import requests
import urllib3.exceptions

from index.serve.api import (ClassifyResponse, EditResponse, Info, LogResponse, SearchResponse,
                             VersionsResponse)

ImageLike = bytes | str | os.PathLike | Any        # file bytes, a path or fsspec URL, or a PIL image
RETRIED_STATUSES = (502, 503, 504)


class VismemError(Exception):
    """A request the server refused or could not answer: its status (None: no answer) and words."""

    def __init__(self, method: str, url: str, status: int | None, detail: Any):
        self.method, self.url, self.status, self.detail = method, url, status, detail
        where = f"{method} {url}"
        super().__init__(f"{where}: {status} {detail}" if status else f"{where}: {detail}")


class RequestRejected(VismemError):
    """A 4xx: the request is wrong (422, 400, 413), unauthorised (401, 403), names what the memory
    does not hold (404) or lost a race with another writer (409). Retrying it unchanged is useless."""


class Unavailable(VismemError):
    """No answer after every retry: the server is down, unreachable or has no shard answering."""


class Client:
    """One served memory. ``token`` (default: ``$VISMEM_TOKEN``) is sent with edits only."""

    def __init__(self, url: str = "http://127.0.0.1:8000", token: str | None = None, timeout: float = 60.0,
                 retries: int = 3, backoff: float = 0.25):
        if retries < 0 or backoff < 0 or timeout <= 0:
            raise ValueError(f"retries and backoff must be >= 0 and timeout > 0, got {retries}, {backoff}, {timeout}")
        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get("VISMEM_TOKEN") or None
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.session = requests.Session()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.session.close()

    def __repr__(self) -> str:
        return f"Client({self.url!r}, token={'set' if self.token else None})"

    # reading ------------------------------------------------------------------------------
    def info(self) -> Info:
        """Version, count, dimension, encoder, shards and search defaults of the served memory."""
        return Info.model_validate(self.call("GET", "/v1/info"))

    def versions(self) -> VersionsResponse:
        return VersionsResponse.model_validate(self.call("GET", "/v1/memory/versions"))

    def log(self) -> LogResponse:
        return LogResponse.model_validate(self.call("GET", "/v1/memory/log"))

    def search(self, images: Sequence[ImageLike] | None = None, vectors: np.ndarray | Sequence | None = None,
               k: int = 10, nprobe: int | None = None) -> SearchResponse:
        """The ``k`` nearest memory items of each image (embedded by the server's encoder) or vector."""
        return SearchResponse.model_validate(self.call("POST", "/v1/search", query(images, vectors, k, nprobe)))

    def classify(self, images: Sequence[ImageLike] | None = None, vectors: np.ndarray | Sequence | None = None,
                 k: int = 10, rule: str = "plurality", nprobe: int | None = None,
                 counterfactual: int | None = None) -> ClassifyResponse:
        """The decision, per-label totals and weighted neighbours of each query under ``rule``;
        ``counterfactual``: with each, the fewest memory items (at most that many) whose removal
        would change it, and the neighbours that would enter in their place."""
        body = {**query(images, vectors, k, nprobe), "rule": rule, "counterfactual": counterfactual}
        return ClassifyResponse.model_validate(self.call("POST", "/v1/classify", body))

    # editing (needs the token) ------------------------------------------------------------
    def add(self, labels: Sequence[str], images: Sequence[ImageLike] | None = None,
            vectors: np.ndarray | Sequence | None = None, uris: Sequence[str] | None = None,
            reason: str | None = None) -> EditResponse:
        """Add images or vectors under ``labels`` (one each); answers from the returned version on see them."""
        body = {**items(images, vectors), "labels": list(labels), "uris": None if uris is None else list(uris),
                "reason": reason}
        return EditResponse.model_validate(self.call("POST", "/v1/memory/add", body, edit=True))

    def remove(self, ids: Sequence[int] | None = None, uris: Sequence[str] | None = None,
               labels: Sequence[str] | None = None, reason: str | None = None) -> EditResponse:
        """Remove memory items by id, URI or whole label, exactly; no later answer holds them."""
        body = {"ids": None if ids is None else [int(i) for i in ids], "uris": None if uris is None else list(uris),
                "labels": None if labels is None else list(labels), "reason": reason}
        return EditResponse.model_validate(self.call("POST", "/v1/memory/remove", body, edit=True))

    def rollback(self, version: int, reason: str | None = None) -> EditResponse:
        """Commit a new version holding version ``version``'s content (see ``/v1/memory/versions``)."""
        body = {"version": int(version), "reason": reason}
        return EditResponse.model_validate(self.call("POST", "/v1/memory/rollback", body, edit=True))

    # transport ----------------------------------------------------------------------------
    def call(self, method: str, path: str, body: dict | None = None, edit: bool = False) -> Any:
        """One request with its retries; the decoded JSON answer, or an exception naming what failed."""
        url = f"{self.url}{path}"
        headers = {"Authorization": f"Bearer {self.token}"} if edit and self.token else {}
        payload = None if body is None else {k: v for k, v in body.items() if v is not None}
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self.session.request(method, url, json=payload, headers=headers, timeout=self.timeout)
            except requests.RequestException as e:
                if last or (edit and not never_sent(e)):
                    raise Unavailable(method, url, None, f"no answer ({type(e).__name__}: {e})") from e
            else:
                if response.status_code not in RETRIED_STATUSES or last:
                    return answer(method, url, response)
            time.sleep(self.backoff * 2 ** attempt)
        raise AssertionError("unreachable")


def answer(method: str, url: str, response: requests.Response) -> Any:
    """The JSON body of a 2xx; ``RequestRejected`` for a 4xx, ``Unavailable`` for a 5xx."""
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.ok and data is not None:
        return data
    detail = data.get("detail", data) if isinstance(data, dict) else (response.text[:500] or response.reason)
    kind = RequestRejected if 400 <= response.status_code < 500 else Unavailable
    raise kind(method, url, response.status_code, detail)


def never_sent(error: requests.RequestException) -> bool:
    """Whether the request failed before any byte reached the server (refused, or connect timeout)."""
    if isinstance(error, requests.exceptions.ConnectTimeout):
        return True
    cause = error.args[0] if error.args else None
    reason = getattr(cause, "reason", cause)
    return isinstance(reason, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError))


def query(images, vectors, k: int, nprobe: int | None) -> dict:
    return {**items(images, vectors), "k": int(k), "nprobe": None if nprobe is None else int(nprobe)}


def items(images, vectors) -> dict:
    """The request's ``images`` (base64 files) or ``vectors`` (float lists); exactly one is given."""
    if (images is None) == (vectors is None):
        raise ValueError("give exactly one of images= (files, paths or URLs, PIL images) or vectors=")
    if vectors is not None:
        array = np.asarray(vectors, dtype=np.float32)
        if array.ndim != 2:
            raise ValueError(f"vectors must be 2-d [n, dim], got shape {array.shape}")
        return {"vectors": array.tolist()}
    if isinstance(images, (bytes, str, os.PathLike)):
        raise ValueError("images= takes a list of images, not one image")
    return {"images": [base64.b64encode(image_bytes(image)).decode() for image in images]}


def image_bytes(image: ImageLike) -> bytes:
    """An image file's bytes: given as bytes, read from a path or fsspec URL, or a PIL image as PNG."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, (str, os.PathLike)):
        with fsspec.open(os.fspath(image), "rb") as f:
            return f.read()
    if hasattr(image, "save"):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"an image is file bytes, a path or URL, or a PIL image; got {type(image).__name__}")
