"""A reward server: any registered reward over HTTP.

Flow-GRPO runs its GenEval scorer as a separate server so that heavy scorers can live on other GPUs or
hosts (its README credits ddpo-pytorch for the idea). Theirs exchanges pickles; this one is safe by
construction and uses only the standard library:

- JSON in and out; images travel as base64-encoded PNG, never pickle;
- bound to 127.0.0.1 unless ``--host`` says otherwise;
- limits on request bytes, batch size and image pixels, each answered with a clear 4xx, after which the
  server keeps serving;
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
import threading
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

from stagerl.errors import UserError
from stagerl.rewards.base import RewardFn, build_reward

log = logging.getLogger(__name__)

DEFAULT_PORT = 8765
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_BATCH = 256
DEFAULT_MAX_PIXELS = 4096 * 4096


class RequestError(Exception):
    """A client error; ``status`` is the HTTP code sent back."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


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
    """Validates requests, scores them, and remembers results by request id."""

    def __init__(self, rewards: dict[str, RewardFn], max_batch: int = DEFAULT_MAX_BATCH,
                 max_pixels: int = DEFAULT_MAX_PIXELS, cache_size: int = 4096):
        self.rewards = dict(rewards)
        self.max_batch = int(max_batch)
        self.max_pixels = int(max_pixels)
        self.cache_size = int(cache_size)
        self._done: OrderedDict[str, tuple[str, dict]] = OrderedDict()  # id -> (digest, response)
        self._running: dict[str, tuple[str, threading.Event]] = {}
        self._lock = threading.Lock()
        self.computed = 0  # number of requests actually scored (not served from the cache)

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "rewards": sorted(self.rewards), "max_batch": self.max_batch,
                "max_pixels": self.max_pixels}

    def score(self, body: bytes) -> dict[str, Any]:
        try:
            req = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(400, f"request body is not valid JSON: {e}") from e
        if not isinstance(req, dict):
            raise RequestError(400, "request body must be a JSON object")
        rid = req.get("request_id")
        if not isinstance(rid, str) or not rid or len(rid) > 200:
            raise RequestError(400, "request_id must be a non-empty string of at most 200 chars")
        digest = hashlib.sha256(body).hexdigest()
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
            with self._lock:
                self._done[rid] = (digest, response)
                while len(self._done) > self.cache_size:
                    self._done.popitem(last=False)
            return response
        finally:
            with self._lock:
                self._running.pop(rid, None)
            event.set()

    def _cached(self, rid: str, digest: str) -> dict[str, Any]:
        old_digest, response = self._done[rid]
        if old_digest != digest:
            raise RequestError(409, f"request_id {rid!r} was already used for a different request")
        self._done.move_to_end(rid)
        return response

    def _compute(self, rid: str, req: dict[str, Any]) -> dict[str, Any]:
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
        return {"request_id": rid, "results": results}

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
    server: "RewardHTTPServer"
    timeout = 120  # seconds a client may take to send its request (slow-client guard)

    def log_message(self, fmt: str, *args: Any) -> None:  # route access logs to logging
        log.debug("%s - %s", self.address_string(), fmt % args)

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        if self.path.rstrip("/") == "/health":
            self._send(200, {**self.server.service.health(),
                             "max_request_bytes": self.server.max_request_bytes})
        else:
            self._send(404, {"error": f"no such endpoint {self.path!r}; use /health or /score"})

    def do_POST(self) -> None:  # noqa: N802
        try:
            if self.path.rstrip("/") != "/score":
                raise RequestError(404, f"no such endpoint {self.path!r}; POST to /score")
            body = self._read_body()
            self._send(200, self.server.service.score(body))
        except RequestError as e:
            log.info("rejected request from %s: %d %s", self.address_string(), e.status, e)
            self._send(e.status, {"error": str(e)})
        except Exception as e:  # noqa: BLE001 - a reward crashed on the whole batch
            log.exception("reward server failed on a request")
            self._send(500, {"error": f"{type(e).__name__}: {e}"})

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            raise RequestError(411, "a Content-Length header is required")
        n, limit = int(length), self.server.max_request_bytes
        if n > limit:
            self._drain(n, limit)
            raise RequestError(413, f"request of {n} bytes exceeds the limit of {limit} bytes")
        return self.rfile.read(n)

    def _drain(self, n: int, limit: int) -> None:
        # Read (and drop) a moderately oversized body so the client sees our 413 instead of a
        # connection reset; a huge one is not read at all and the connection is closed.
        self.close_connection = True
        if n <= 4 * limit:
            while n > 0:
                chunk = self.rfile.read(min(n, 1 << 20))
                if not chunk:
                    break
                n -= len(chunk)


class RewardHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], service: RewardService, max_request_bytes: int):
        self.service = service
        self.max_request_bytes = int(max_request_bytes)
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def make_server(rewards: dict[str, RewardFn], host: str = "127.0.0.1", port: int = 0,
                max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                max_batch: int = DEFAULT_MAX_BATCH,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> RewardHTTPServer:
    """A ready (not yet serving) server; ``port=0`` picks a free port (see ``server.url``)."""
    service = RewardService(rewards, max_batch=max_batch, max_pixels=max_pixels)
    return RewardHTTPServer((host, port), service, max_request_bytes)


# --- CLI ---------------------------------------------------------------------------------------

def add_cli_args(parser: Any) -> None:
    """Arguments of ``stagerl reward-server``; numbers out of range are one-line errors."""
    from stagerl.preflight import float_arg, int_arg

    parser.add_argument("--rewards", required=True,
                        help="comma-separated registered reward names to serve, e.g. geneval,ocr")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default 127.0.0.1; 0.0.0.0 exposes the server to "
                             "the network, which has no authentication)")
    parser.add_argument("--port", type=int_arg(1, 65535), default=DEFAULT_PORT,
                        help="TCP port, 1-65535 (default 8765)")
    parser.add_argument("--reward-kwargs", default="{}",
                        help='JSON object {reward_name: {kwarg: value}}, e.g. '
                             '\'{"geneval": {"device": "cuda:1"}}\'')
    parser.add_argument("--config", default=None,
                        help="YAML config file; its reward.kwargs are used (--reward-kwargs wins)")
    parser.add_argument("--max-request-mb", type=float_arg(0.0, 1 << 20, lo_open=True),
                        default=DEFAULT_MAX_REQUEST_BYTES / 2**20,
                        help="largest accepted request body in MiB (default 64)")
    parser.add_argument("--max-batch", type=int_arg(1), default=DEFAULT_MAX_BATCH,
                        help="largest accepted number of images per request (default 256)")
    parser.add_argument("--no-preload", action="store_true",
                        help="load models on the first request instead of at start-up")


def _cli_kwargs(args: Any, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """reward.kwargs of --config, updated by --reward-kwargs. A --config may hold arguments of
    rewards this server does not serve; --reward-kwargs may name only the served ``names``."""
    from stagerl.rewards.base import check_reward_kwargs

    kwargs: dict[str, dict[str, Any]] = {}
    if args.config:
        from stagerl.config import load_config

        kwargs.update(dict(load_config(args.config).reward.kwargs))
        check_reward_kwargs(kwargs)
    try:
        extra = json.loads(args.reward_kwargs)
    except json.JSONDecodeError as e:
        raise UserError(f"--reward-kwargs is not valid JSON: {e}") from e
    if not isinstance(extra, dict):
        raise UserError("--reward-kwargs must be a JSON object {reward_name: {kwarg: value}}")
    try:
        check_reward_kwargs(extra, names, what="the served --rewards")
    except UserError as e:
        raise UserError(f"--reward-kwargs: {e}") from None
    kwargs.update(extra)
    return kwargs


def run_cli(args: Any) -> int:
    """Build the rewards and serve until interrupted; returns the exit code."""
    names = [n.strip() for n in str(args.rewards).split(",") if n.strip()]
    if not names:
        raise UserError("--rewards needs at least one reward name")
    if "remote" in names:
        raise UserError("the reward server cannot serve the 'remote' reward itself")
    if not args.host.strip():
        raise UserError("--host: expected an interface such as 127.0.0.1")
    kwargs = _cli_kwargs(args, names)
    rewards = {n: build_reward(n, **dict(kwargs.get(n) or {})) for n in names}
    if not args.no_preload:
        for fn in rewards.values():
            if hasattr(fn, "ensure_loaded"):
                fn.ensure_loaded()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("reward server bound to %s: it has no authentication, so only do this on a "
                    "trusted network", args.host)
    try:
        server = make_server(rewards, host=args.host, port=args.port,
                             max_request_bytes=int(args.max_request_mb * 2**20),
                             max_batch=args.max_batch)
    except OSError as e:
        raise UserError(f"cannot bind {args.host}:{args.port}: {e}") from e
    log.info("serving rewards %s on %s", names, server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("reward server interrupted; shutting down")
    finally:
        server.server_close()
    return 0
