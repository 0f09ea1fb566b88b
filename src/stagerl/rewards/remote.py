"""The ``remote`` reward: score on a ``stagerl reward-server`` elsewhere.

Flow-GRPO scores GenEval on a separate server; this client does the same safely:
- JSON with base64 PNG images (never pickle), see :mod:`stagerl.rewards.server`;
- a timeout per attempt and a bounded number of retries with exponential backoff;
- idempotent: every chunk gets one request id that all its retries reuse, so a retry of a request the
  server already scored is answered from the server's store instead of being scored again, and the
  client accepts exactly one answer per chunk (nothing is lost or counted twice).

Connection errors, timeouts and 5xx answers are retried; a 4xx answer is a configuration error
(unknown reward name, oversized batch) and raises :class:`UserError`. When every retry fails, the
chunk's images are marked ``valid=False`` with the error in their details (a recorded event, not a
crash and not a silent 0).

With several served rewards the column is ``sum_k weights[k] * score_k``; each score is kept in the
details under ``scores``.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import socket
import time
import urllib.error
import urllib.request
import uuid
from typing import Any, Sequence

import torch
from PIL import Image

from stagerl.errors import UserError
from stagerl.preflight import NETWORK_TIMEOUT
from stagerl.rewards.base import RewardOutput, register_reward
from stagerl.rewards.server import jsonable

log = logging.getLogger(__name__)


def encode_png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class _Retryable(Exception):
    pass


@register_reward("remote")
class RemoteReward:
    """``remote``: kwargs ``url``, ``rewards`` (names served there), ``weights``, ``timeout``
    (seconds per attempt), ``retries`` (extra attempts), ``backoff`` (first wait, doubled each
    retry, capped at ``max_backoff``), ``batch_size`` (images per request)."""

    name = "remote"

    def __init__(self, url: str = "http://127.0.0.1:8765", rewards: Sequence[str] | str = (),
                 weights: Sequence[float] | None = None, timeout: float = 600.0, retries: int = 5,
                 backoff: float = 1.0, max_backoff: float = 30.0, batch_size: int = 64):
        names = [rewards] if isinstance(rewards, str) else list(rewards)
        names = [n.strip() for name in names for n in name.split(",") if n.strip()]
        if not names:
            raise UserError("reward 'remote' needs kwargs.rewards: the reward names the server "
                            "should compute, e.g. [geneval]")
        if weights is not None and len(weights) != len(names):
            raise UserError(f"reward 'remote': {len(weights)} weights for {len(names)} rewards")
        if int(retries) < 0 or float(timeout) <= 0 or int(batch_size) < 1:
            raise UserError("reward 'remote': need retries >= 0, timeout > 0, batch_size >= 1")
        if not url.startswith(("http://", "https://")):
            raise UserError(f"reward 'remote': url must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        self.names = names
        self.weights = [float(w) for w in weights] if weights is not None else [1.0] * len(names)
        self.timeout, self.retries = float(timeout), int(retries)
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self.batch_size = int(batch_size)

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str],
                 metadata: Sequence[dict[str, Any]] | None = None) -> RewardOutput:
        n = len(images)
        metadata = list(metadata) if metadata is not None else [{} for _ in range(n)]
        if len(prompts) != n or len(metadata) != n:
            raise ValueError(f"reward 'remote': {n} images, {len(prompts)} prompts and "
                             f"{len(metadata)} metadata entries must match")
        scores, valid, details = [0.0] * n, [False] * n, [{} for _ in range(n)]
        for lo in range(0, n, self.batch_size):
            hi = min(n, lo + self.batch_size)
            payload = {"request_id": uuid.uuid4().hex, "rewards": self.names,
                       "images": [encode_png(im) for im in images[lo:hi]],
                       "prompts": list(prompts[lo:hi]), "metadata": jsonable(metadata[lo:hi])}
            try:
                response = self._post(payload)
            except _Retryable as e:
                log.error("remote reward at %s failed after %d attempts: %s", self.url,
                          self.retries + 1, e)
                for i in range(lo, hi):
                    details[i] = {"error": f"remote reward server unreachable: {e}"}
                continue
            try:
                self._unpack(response, lo, hi, scores, valid, details)
            except (KeyError, IndexError, TypeError) as e:
                log.error("remote reward at %s sent a malformed answer: %r", self.url, e)
                for i in range(lo, hi):
                    scores[i], valid[i] = 0.0, False
                    details[i] = {"error": f"malformed answer from the reward server: {e!r}"}
        return RewardOutput(scores=torch.tensor(scores), valid=torch.tensor(valid), details=details)

    def _unpack(self, response: dict[str, Any], lo: int, hi: int, scores: list[float],
                valid: list[bool], details: list[dict[str, Any]]) -> None:
        results = response["results"]
        for j, i in enumerate(range(lo, hi)):
            per = {name: results[name]["scores"][j] for name in self.names}
            ok = all(results[name]["valid"][j] for name in self.names)
            scores[i] = sum(w * per[name] for w, name in zip(self.weights, self.names))
            valid[i] = ok
            details[i] = {"scores": per, **{name: results[name]["details"][j]
                                             for name in self.names}}

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        """POST with bounded retries and exponential backoff; the request id never changes."""
        body = json.dumps(payload).encode()
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                wait = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                log.warning("remote reward: attempt %d/%d failed (%s); retrying in %.2fs",
                            attempt, self.retries + 1, last, wait)
                time.sleep(wait)
            try:
                return self._post_once(body)
            except _Retryable as e:
                last = e
        raise _Retryable(str(last))

    def _post_once(self, body: bytes) -> dict[str, Any]:
        req = urllib.request.Request(f"{self.url}/score", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            message = _error_text(e)
            if e.code >= 500:
                raise _Retryable(f"HTTP {e.code}: {message}") from e
            raise UserError(f"remote reward server {self.url} rejected the request "
                            f"(HTTP {e.code}): {message}") from e
        except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError,
                json.JSONDecodeError, http.client.HTTPException, OSError) as e:
            raise _Retryable(f"{type(e).__name__}: {e}") from e

    def health(self, timeout: float | None = None) -> dict[str, Any]:
        """The server's /health answer (served rewards and limits)."""
        with urllib.request.urlopen(f"{self.url}/health",
                                    timeout=self.timeout if timeout is None else timeout) as resp:
            return json.loads(resp.read())

    def preflight(self) -> None:
        """Before the policy loads: a reward server answers /health at ``url`` within a few
        seconds (one attempt, no retries) and serves every reward in ``rewards``."""
        timeout = min(self.timeout, NETWORK_TIMEOUT)
        try:
            served = self.health(timeout)["rewards"]
        except urllib.error.HTTPError as e:
            raise UserError(f"reward 'remote': {self.url}/health answered HTTP {e.code}; is "
                            f"reward.kwargs.remote.url a stagerl reward-server?") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            why = getattr(getattr(e, "reason", None), "strerror", None) or \
                getattr(e, "reason", None) or e
            raise UserError(f"reward 'remote': no reward server answered at {self.url} within "
                            f"{timeout:g} s ({why}); start one there (stagerl reward-server "
                            f"--rewards {','.join(self.names)}) or fix "
                            f"reward.kwargs.remote.url") from None
        except (ValueError, KeyError, TypeError):
            raise UserError(f"reward 'remote': {self.url}/health did not answer as a stagerl "
                            f"reward-server; check reward.kwargs.remote.url") from None
        missing = [n for n in self.names if n not in served]
        if missing:
            raise UserError(f"reward 'remote': the server at {self.url} serves "
                            f"{', '.join(served) or 'no rewards'}, not {', '.join(missing)}; "
                            f"fix reward.kwargs.remote.rewards or restart the server with them")


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(e.read()).get("error", e.reason))
    except Exception:  # noqa: BLE001 - best effort
        return str(e.reason)
