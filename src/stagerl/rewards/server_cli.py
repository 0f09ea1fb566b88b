"""``stagerl reward-server``: its command-line options and the serving loop around
:func:`stagerl.rewards.server.make_server` (the HTTP service itself, its limits and status codes
are in :mod:`stagerl.rewards.server`; docs/rewards.md, "Reward server").
"""

from __future__ import annotations

import json
import logging
from typing import Any

from stagerl.errors import UserError
from stagerl.rewards.base import build_reward
from stagerl.rewards.server import (DEFAULT_CACHE_BYTES, DEFAULT_MAX_BATCH,
                                    DEFAULT_MAX_REQUEST_BYTES, DEFAULT_PORT, DEFAULT_READ_TIMEOUT,
                                    DEFAULT_WORKERS, make_server)

log = logging.getLogger("stagerl.rewards.server")  # one logger for the service and its loop


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
    parser.add_argument("--workers", type=int_arg(1, 1024), default=DEFAULT_WORKERS,
                        help="handler threads, i.e. requests read and scored at once; the listen "
                             "backlog is max(128, 16 x workers) (default 8)")
    parser.add_argument("--read-timeout", type=float_arg(0.0, 3600.0, lo_open=True),
                        default=DEFAULT_READ_TIMEOUT,
                        help="seconds a client may pause while sending its request; a body still "
                             "shorter than its Content-Length then gets 400 (default 30)")
    parser.add_argument("--cache-mb", type=float_arg(0.0, 1 << 20),
                        default=DEFAULT_CACHE_BYTES / 2**20,
                        help="MiB of recent answers kept so that a retried request is not scored "
                             "twice (default 16; 0 turns the store off)")
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
                             max_batch=args.max_batch, workers=args.workers,
                             read_timeout=args.read_timeout,
                             cache_bytes=int(args.cache_mb * 2**20))
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
