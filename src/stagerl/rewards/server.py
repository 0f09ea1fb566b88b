"""A reward server: any registered reward over HTTP.

Flow-GRPO runs its GenEval scorer as a separate server so that heavy scorers can live on other GPUs or
hosts (its README credits ddpo-pytorch for the idea). Theirs exchanges pickles; this one is safe by
construction and uses only the standard library:

- JSON in and out; images travel as base64-encoded PNG, never pickle;
- bound to 127.0.0.1 unless ``--host`` says otherwise;
- limits on request bytes, batch size, image pixels and JSON nesting, each answered with a clear 4xx,
  after which the server keeps serving; every malformed request (bad Content-Length, a body shorter
  than announced, unknown path or method, garbled request line) gets a 4xx with a one-line JSON
  ``{"error": ...}`` body. 500 is kept for a reward that fails on a whole batch;
- a fixed pool of ``workers`` threads handles the connections, with a listen backlog sized from it, so
  memory stays bounded under bursts; a client that hangs up is one info log line, not a traceback;
- the stored results are serialized JSON bytes, bounded by count and by ``cache_bytes``;
- ``GET /health`` reports the served rewards and the limits;
- ``POST /score`` is idempotent per ``request_id``: a retried request (client timeout, lost response)
  returns the stored result instead of scoring twice, and a retry that arrives while the first attempt
  is still running waits for it.

Wire format (``POST /score``)::

    {"request_id": "...", "rewards": ["ocr"], "images": ["<base64 png>"], "prompts": ["..."],
     "metadata": [{...}]}
    -> {"request_id": "...", "results": {"ocr": {"scores": [..], "valid": [..], "details": [..]}}}
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import logging
import queue
import sys
import threading
from collections import OrderedDict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from PIL import Image

from stagerl.rewards.base import RewardFn

log = logging.getLogger(__name__)

DEFAULT_PORT = 8765
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_BATCH = 256
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_WORKERS = 8
DEFAULT_READ_TIMEOUT = 30.0  # seconds a request may pause while sending (slow/stalled client guard)
DEFAULT_CACHE_BYTES = 16 * 1024 * 1024
DEFAULT_CACHE_SIZE = 4096
MAX_JSON_DEPTH = 64  # a request is a flat object; metadata entries may nest a little

# A client that goes away mid-request: logged as one info line, never as a server error.
HANGUP = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


class RequestError(Exception):
    """A client error; ``status`` is the HTTP code sent back."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def json_depth(obj: Any, limit: int) -> bool:
    """Whether ``obj`` nests at most ``limit`` lists/objects deep (iterative: no recursion)."""
    stack = [(obj, 1)]
    while stack:
        x, depth = stack.pop()
        if isinstance(x, (list, dict)):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in (x.values() if isinstance(x, dict) else x))
    return True


def parse_request_json(body: bytes | bytearray) -> Any:
    """The request body as JSON; anything unparsable or nested deeper than ``MAX_JSON_DEPTH`` is a
    400. json's C decoder recurses per nesting level and raises RecursionError near the interpreter
    limit, so a deep body is caught there and everything it accepted is checked iteratively."""
    too_deep = f"request JSON nests more than {MAX_JSON_DEPTH} levels of lists/objects"
    try:
        req = json.loads(body)
    except RecursionError:
        raise RequestError(400, too_deep) from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, int-string limit of huge numbers
        raise RequestError(400, f"request body is not valid JSON: {e}") from None
    if not json_depth(req, MAX_JSON_DEPTH):
        raise RequestError(400, too_deep)
    return req


def jsonable(x: Any) -> Any:
    """Reward details -> plain JSON types (tensors/arrays become lists, anything else a string)."""
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "tolist"):  # torch tensors, numpy arrays and scalars
        return jsonable(x.tolist())
    return str(x)


def decode_png(data: Any, max_pixels: int) -> Image.Image:
    if not isinstance(data, str):
        raise RequestError(400, "each image must be a base64 string of a PNG file")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"image is not valid base64: {e}") from e
    try:
        img = Image.open(io.BytesIO(raw), formats=["PNG"])
        if img.width * img.height > max_pixels:
            raise RequestError(413, f"image of {img.width}x{img.height} pixels exceeds the limit "
                                    f"of {max_pixels} pixels")
        img.load()
    except RequestError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure is the client's bad input
        raise RequestError(400, f"image is not a readable PNG: {e}") from e
    return img.convert("RGB")


class RewardService:
    """Validates requests, scores them, and remembers results by request id.

    The store keeps each answer as its serialized JSON bytes (a few hundred bytes per image instead
    of a tree of Python objects), at most ``cache_size`` answers and ``cache_bytes`` bytes, least
    recently used first out; an answer larger than ``cache_bytes`` is not stored (a retry of it is
    scored again)."""

    def __init__(self, rewards: dict[str, RewardFn], max_batch: int = DEFAULT_MAX_BATCH,
                 max_pixels: int = DEFAULT_MAX_PIXELS, cache_size: int = DEFAULT_CACHE_SIZE,
                 cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.rewards = dict(rewards)
        self.max_batch = int(max_batch)
        self.max_pixels = int(max_pixels)
        self.cache_size = int(cache_size)
        self.cache_bytes = int(cache_bytes)
        self._done: OrderedDict[str, tuple[bytes, bytes]] = OrderedDict()  # id -> (digest, answer)
        self._done_bytes = 0
        self._running: dict[str, tuple[bytes, threading.Event]] = {}
        self._lock = threading.Lock()
        self.computed = 0  # number of requests actually scored (not served from the cache)

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "rewards": sorted(self.rewards), "max_batch": self.max_batch,
                "max_pixels": self.max_pixels}

    def score(self, body: bytes | bytearray) -> bytes:
        """The JSON answer (bytes) to a ``POST /score`` body; raises RequestError for bad input."""
        req = parse_request_json(body)
        if not isinstance(req, dict):
            raise RequestError(400, "request body must be a JSON object")
        rid = req.get("request_id")
        if not isinstance(rid, str) or not rid or len(rid) > 200:
            raise RequestError(400, "request_id must be a non-empty string of at most 200 chars")
        digest = hashlib.sha256(body).digest()
        while True:
            with self._lock:
                if rid in self._done:
                    return self._cached(rid, digest)
                if rid not in self._running:
                    event = threading.Event()
                    self._running[rid] = (digest, event)
                    break
                other_digest, other = self._running[rid]
            if other_digest != digest:
                raise RequestError(409, f"request_id {rid!r} is in use by a different request")
            other.wait()  # same request already being scored: wait, then serve its result
        try:
            response = self._compute(rid, req)
            self._store(rid, digest, response)
            return response
        finally:
            with self._lock:
                self._running.pop(rid, None)
            event.set()

    def _store(self, rid: str, digest: bytes, response: bytes) -> None:
        if len(response) > self.cache_bytes or self.cache_size < 1:
            return
        with self._lock:
            self._done[rid] = (digest, response)
            self._done_bytes += len(response)
            while len(self._done) > self.cache_size or self._done_bytes > self.cache_bytes:
                self._done_bytes -= len(self._done.popitem(last=False)[1][1])

    def _cached(self, rid: str, digest: bytes) -> bytes:
        old_digest, response = self._done[rid]
        if old_digest != digest:
            raise RequestError(409, f"request_id {rid!r} was already used for a different request")
        self._done.move_to_end(rid)
        return response

    def _compute(self, rid: str, req: dict[str, Any]) -> bytes:
        names, images, prompts, metadata = self._validate(req)
        results = {}
        for name in names:
            out = self.rewards[name](images, prompts, metadata)
            details = list(out.details) + [{}] * (len(images) - len(out.details))
            results[name] = {"scores": [float(s) for s in out.scores.tolist()],
                             "valid": [bool(v) for v in out.valid.tolist()],
                             "details": jsonable(details)}
        with self._lock:
            self.computed += 1
        return json.dumps({"request_id": rid, "results": results}).encode()

    def _validate(self, req: dict[str, Any]) -> tuple[list[str], list[Image.Image], list[str],
                                                      list[dict[str, Any]]]:
        names = req.get("rewards") or sorted(self.rewards)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise RequestError(400, "rewards must be a list of reward names")
        unknown = [n for n in names if n not in self.rewards]
        if unknown:
            raise RequestError(400, f"this server does not serve {unknown}; it serves "
                                    f"{sorted(self.rewards)}")
        images, prompts = req.get("images"), req.get("prompts")
        if not isinstance(images, list) or not isinstance(prompts, list):
            raise RequestError(400, "images and prompts must be lists")
        if len(images) > self.max_batch:
            raise RequestError(413, f"batch of {len(images)} images exceeds the server limit of "
                                    f"{self.max_batch}; send smaller batches")
        metadata = req.get("metadata")
        metadata = [{} for _ in images] if metadata is None else metadata
        if not isinstance(metadata, list) or not all(isinstance(m, (dict, type(None)))
                                                     for m in metadata):
            raise RequestError(400, "metadata must be a list of JSON objects (or null)")
        if not (len(images) == len(prompts) == len(metadata)):
            raise RequestError(400, f"{len(images)} images, {len(prompts)} prompts and "
                                    f"{len(metadata)} metadata entries must match")
        if not all(isinstance(p, str) for p in prompts):
            raise RequestError(400, "prompts must be strings")
        decoded = [decode_png(x, self.max_pixels) for x in images]
        return names, decoded, prompts, [m or {} for m in metadata]


class _Handler(BaseHTTPRequestHandler):
    """Routes ``GET /health`` and ``POST /score``; every other request gets a JSON 4xx."""

    server: "RewardHTTPServer"
    routes = {"/health": "GET", "/score": "POST"}
    # A garbled request line is answered as HTTP/1.0 (with a status line), never as bare HTTP/0.9.
    default_request_version = "HTTP/1.0"

    def setup(self) -> None:
        self.timeout = self.server.read_timeout  # socket timeout for the request line, headers, body
        super().setup()

    def __getattr__(self, name: str) -> Any:
        # http.server calls do_<METHOD>; every method goes through one router, so an unknown
        # method is a 405 (or 404 for an unknown path) instead of the base class's 501.
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    def log_message(self, fmt: str, *args: Any) -> None:  # route access logs to logging
        log.debug("%s - %s", self.address_string(), fmt % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's answer to an unparsable request line or headers (400, 414, 431, 505),
        as one-line JSON; a request this server cannot parse is the client's error, so 5xx -> 400."""
        status = int(code)
        text = message or HTTPStatus(status).phrase
        if status >= 500:
            status = 400
        self.close_connection = True
        self._reject(RequestError(status, text))

    def _dispatch(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        method = self.routes.get(path)
        try:
            if method is None:
                raise RequestError(404, f"no such endpoint {path!r}; use GET /health or "
                                        f"POST /score")
            if self.command != method:
                raise RequestError(405, f"{path} accepts only {method}, not {self.command}")
            if path == "/health":
                answer = json.dumps({**self.server.service.health(),
                                     "max_request_bytes": self.server.max_request_bytes}).encode()
            else:
                answer = self.server.service.score(self._read_body())
        except RequestError as e:
            self._reject(e, allow=method)
            return
        except HANGUP as e:
            self._hung_up(e)
            return
        except Exception as e:  # noqa: BLE001 - a reward crashed on the whole batch: a genuine 500
            log.exception("reward server failed on a request")
            self._answer(500, json.dumps({"error": f"{type(e).__name__}: {e}"}).encode())
            return
        self._answer(200, answer)

    def _reject(self, e: RequestError, allow: str | None = None) -> None:
        log.info("rejected request from %s: %d %s", self.client_address[0], e.status, str(e))
        self.close_connection = True
        headers = {"Allow": allow} if e.status == 405 and allow else {}
        self._answer(e.status, json.dumps({"error": str(e)}).encode(), headers)

    def _hung_up(self, e: BaseException) -> None:
        self.close_connection = True
        log.info("client %s hung up (%s)", self.client_address[0], type(e).__name__)

    def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            self.wfile.flush()
        except HANGUP as e:
            self._hung_up(e)
        except TimeoutError:
            self.close_connection = True
            log.info("client %s stopped reading its answer; closed", self.client_address[0])

    def _read_body(self) -> bytearray:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise RequestError(411, "chunked request bodies are not supported; send a "
                                    "Content-Length")
        values = [v.strip(" \t") for v in self.headers.get_all("Content-Length") or []]
        if not values:
            raise RequestError(411, "a Content-Length header is required")
        text = values[0]
        # Only plain ASCII digits: str.isdigit() alone also accepts '²' (which int() rejects) and
        # int() alone accepts '+5', ' 5', '5_0' and other scripts' digits.
        if len(set(values)) > 1 or not (text.isascii() and text.isdigit()):
            raise RequestError(400, f"Content-Length must be one number in ASCII digits, got "
                                    f"{', '.join(values)[:40]!r}")
        limit = self.server.max_request_bytes
        if len(text) > 18:
            self.close_connection = True
            raise RequestError(413, f"request of {text[:20]}... bytes exceeds the limit of {limit} "
                                    f"bytes")
        n = int(text)
        if n > limit:
            self._drain(n, limit)
            raise RequestError(413, f"request of {n} bytes exceeds the limit of {limit} bytes")
        body = bytearray()
        try:
            while len(body) < n:
                chunk = self.rfile.read1(min(n - len(body), 1 << 20))
                if not chunk:
                    raise RequestError(400, f"request body ended after {len(body)} of the {n} "
                                            f"bytes its Content-Length announced")
                body += chunk
        except TimeoutError:
            raise RequestError(400, f"request body stopped after {len(body)} of the {n} bytes its "
                                    f"Content-Length announced (nothing more within "
                                    f"{self.server.read_timeout:g} s, see --read-timeout)") from None
        return body

    def _drain(self, n: int, limit: int) -> None:
        # Read (and drop) a moderately oversized body so the client sees our 413 instead of a
        # connection reset; a huge one is not read at all and the connection is closed.
        self.close_connection = True
        if n <= 4 * limit:
            try:
                while n > 0:
                    chunk = self.rfile.read1(min(n, 1 << 20))
                    if not chunk:
                        break
                    n -= len(chunk)
            except TimeoutError:
                pass


class RewardHTTPServer(HTTPServer):
    """An HTTP server with a fixed pool of ``workers`` handler threads.

    Accepted connections wait in a queue of ``request_queue_size`` for a free worker, and further
    ones in the kernel's listen backlog of the same size (the standard library's default backlog
    of 5 makes a burst of clients retry their SYN after a second or more). A fixed pool bounds the
    memory of bodies being read and decoded at once (``workers`` x the request limit) and reuses
    its threads instead of starting one per connection."""

    def __init__(self, address: tuple[str, int], service: RewardService, max_request_bytes: int,
                 workers: int = DEFAULT_WORKERS, read_timeout: float = DEFAULT_READ_TIMEOUT):
        self.service = service
        self.max_request_bytes = int(max_request_bytes)
        self.workers = int(workers)
        self.read_timeout = float(read_timeout)
        if self.workers < 1 or not self.read_timeout > 0:
            raise ValueError("reward server: need workers >= 1 and read_timeout > 0")
        self.request_queue_size = max(128, 16 * self.workers)  # listen(backlog) in server_activate
        self._pending: queue.Queue = queue.Queue(maxsize=self.request_queue_size)
        self._closing = threading.Event()
        super().__init__(address, _Handler)
        self._threads = [threading.Thread(target=self._work, name=f"reward-server-{k}", daemon=True)
                         for k in range(self.workers)]
        for t in self._threads:
            t.start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def process_request(self, request: Any, client_address: Any) -> None:
        while not self._closing.is_set():  # queue full: stop accepting; the backlog holds the rest
            try:
                self._pending.put((request, client_address), timeout=0.2)
                return
            except queue.Full:
                continue
        self.shutdown_request(request)

    def _work(self) -> None:
        while True:
            item = self._pending.get()
            if item is None:
                return
            request, client_address = item
            try:
                self.finish_request(request, client_address)
            except Exception:  # noqa: BLE001 - reported by handle_error, the worker goes on
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed outside the handler's own answers: a client that went away or
        stalled is one info line; anything else is a server bug, logged with its traceback."""
        exc = sys.exc_info()[1]
        host = client_address[0] if client_address else "?"
        if isinstance(exc, HANGUP + (TimeoutError,)):
            log.info("client %s hung up (%s)", host, type(exc).__name__)
        else:
            log.exception("reward server: unexpected error on a connection from %s", host)

    def shutdown(self) -> None:
        self._closing.set()
        super().shutdown()

    def server_close(self) -> None:
        super().server_close()
        self._closing.set()
        while True:  # connections accepted but never handled are closed
            try:
                item = self._pending.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self.shutdown_request(item[0])
        for _ in self._threads:
            try:
                self._pending.put_nowait(None)
            except queue.Full:
                break


def make_server(rewards: dict[str, RewardFn], host: str = "127.0.0.1", port: int = 0,
                max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                max_batch: int = DEFAULT_MAX_BATCH,
                max_pixels: int = DEFAULT_MAX_PIXELS, workers: int = DEFAULT_WORKERS,
                read_timeout: float = DEFAULT_READ_TIMEOUT,
                cache_bytes: int = DEFAULT_CACHE_BYTES,
                cache_size: int = DEFAULT_CACHE_SIZE) -> RewardHTTPServer:
    """A ready (not yet serving) server; ``port=0`` picks a free port (see ``server.url``)."""
    service = RewardService(rewards, max_batch=max_batch, max_pixels=max_pixels,
                            cache_size=cache_size, cache_bytes=cache_bytes)
    return RewardHTTPServer((host, port), service, max_request_bytes, workers=workers,
                            read_timeout=read_timeout)
