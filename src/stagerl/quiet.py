"""Known-harmless warnings that DeepSpeed, torch and the checkpoint writers repeat on every run or
save, filtered out by the CLI so that what is left is what a user must see.

Each entry below names the exact message and why it is harmless; nothing else is touched: errors,
other warnings of the same libraries and messages that change what a run does pass through.
``stagerl -v`` (``--verbose``) installs no filter. The list and what each means are in
docs/development.md, "Quiet runs".
"""

from __future__ import annotations

import logging
import re
import warnings

# (logger name, message regex, why it is harmless)
LOG_MESSAGES: tuple[tuple[str, str, str], ...] = (
    ("torch.utils.cpp_extension", r"^No CUDA runtime is found, using CUDA_HOME=",
     "a CUDA build of torch on a machine without a GPU: DeepSpeed imports torch's extension "
     "builder, and its CPU ops need no CUDA"),
    ("accelerate.utils.other",
     r"Removed shared tensor \{'(?:[\w.]*\.)?lm_head\.weight'\} while saving",
     "every checkpoint save: Janus ties lm_head to the text embeddings, so safetensors keeps one "
     "copy and loading ties them again (resume is tested exact); another shared tensor still "
     "shows"),
)

# (warning category, message regex, why it is harmless)
WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
     "DeepSpeed's own collectives call the old name; nothing a user can change"),
    (FutureWarning, r"`torch\.distributed\.reduce_scatter_tensor` is deprecated",
     "the same, for DeepSpeed's gradient reduce-scatter"),
)


class _DropMessages(logging.Filter):
    """Drops the records of one logger whose message matches one of ``patterns``."""

    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True  # never hide an error
        msg = record.getMessage()
        return not any(p.search(msg) for p in self.patterns)


def install(verbose: bool = False) -> None:
    """Install the filters (idempotent); with ``verbose`` install none."""
    if verbose:
        return
    by_logger: dict[str, list[str]] = {}
    for name, pattern, _ in LOG_MESSAGES:
        by_logger.setdefault(name, []).append(pattern)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(patterns))
    for category, pattern, _ in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
