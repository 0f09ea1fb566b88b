"""DeepSpeed's C++ ops that a run compiles on first use, said before it happens.

DeepSpeed installed from PyPI ships its C++ ops as sources. Two of them are compiled with g++ the
first time a run needs them, silently, and cached under ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``):

- ``cpu_adam``: the CPU Adam that accelerate swaps in when the launch file offloads the optimizer
  (``offload_optimizer_device: cpu``);
- ``deepspeed_shm_comm``: DeepSpeed's shared-memory collectives, loaded by every DeepSpeed run on a
  machine without a GPU.

Each takes minutes on a 2-core machine (docs/development.md, "DeepSpeed from source", has the
measured times), long enough that a silent run looks hung. :func:`announce_builds` logs one line
per op that is neither prebuilt into the installed DeepSpeed nor cached, before DeepSpeed builds
it, with the command that prebuilds it. The test suite compiles them once before the engine tests
(tests/conftest.py, :func:`build_pending`), outside the tests' timeouts.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)

# op name -> (DeepSpeed builder class, DS_BUILD_* switch, what it is for, measured JIT build time
# on a busy 2-core CPU, docs/development.md)
OPS: dict[str, tuple[str, str, str, str]] = {
    "cpu_adam": ("CPUAdamBuilder", "DS_BUILD_CPU_ADAM", "CPU Adam, for optimizer offload",
                 "about 9 min"),
    "deepspeed_shm_comm": ("ShareMemCommBuilder", "DS_BUILD_SHM_COMM",
                           "shared-memory collectives, for DeepSpeed without a GPU",
                           "about 3.5 min"),
}


def needed_ops(ds_config: dict[str, Any], has_gpu: bool) -> list[str]:
    """The ops of :data:`OPS` a DeepSpeed run with this config loads (DeepSpeed's own config
    dict, e.g. ``DeepSpeedPlugin.deepspeed_config``)."""
    zero = ds_config.get("zero_optimization") or {}
    offload = str((zero.get("offload_optimizer") or {}).get("device", "none")).lower()
    ops = [] if has_gpu else ["deepspeed_shm_comm"]
    if offload in ("cpu", "nvme"):
        ops.append("cpu_adam")
    return ops


def jit_build_dir(name: str) -> str:
    """Where torch's JIT build of extension ``name`` lives (the layout of
    ``torch.utils.cpp_extension``: ``$TORCH_EXTENSIONS_DIR/<name>``, else
    ``~/.cache/torch_extensions/py<ver>_<cpu|cuXXX|rocmXXX>/<name>``)."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        if torch.version.hip is not None:
            acc = f"rocm{torch.version.hip.replace('.', '')}"
        elif torch.version.cuda is not None:
            acc = f"cu{torch.version.cuda.replace('.', '')}"
        else:
            acc = "cpu"
        ver = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        root = os.path.join(get_default_build_root(), f"{ver}_{acc}")
    return os.path.join(root, name)


def pending_builds(names: list[str]) -> list[str]:
    """Those of ``names`` that DeepSpeed would compile now: usable on this machine, not prebuilt
    into the installed package for this accelerator, and not in the JIT cache."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name, installed_ops

    acc = get_accelerator()
    pending = []
    for name in names:
        builder = acc.create_op_builder(OPS[name][0])
        if builder is None or not deepspeed.ops.__compatible_ops__.get(name, False):
            continue  # DeepSpeed does not load it here
        if installed_ops.get(name, False) and accelerator_name == acc._name:
            continue  # prebuilt (DS_BUILD_*=1 at install)
        if os.path.exists(os.path.join(jit_build_dir(name), f"{name}.so")):
            continue  # compiled by an earlier run
        pending.append(name)
    return pending


def _deepspeed_version() -> str:
    import deepspeed

    return str(deepspeed.__version__)


def announce_builds(ds_config: dict[str, Any]) -> list[str]:
    """Log one warning (main process) per op this run will compile first; returns their names."""
    import torch

    has_gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    try:
        pending = pending_builds(needed_ops(ds_config, has_gpu))
    except (ImportError, AttributeError, KeyError):  # a DeepSpeed that answers differently:
        return []                                    # a missing notice must not fail the run
    if pending and int(os.environ.get("RANK", "0")) == 0:
        switches = " ".join(f"{OPS[n][1]}=1" for n in pending)
        for name in pending:
            log.warning(
                "DeepSpeed compiles its C++ op %s (%s) now, once, with no output meanwhile: "
                "%s measured on a busy 2-core CPU, less with more cores. Later runs reuse %s. "
                "To build it ahead instead: %s pip install --no-build-isolation --no-cache-dir "
                "--force-reinstall --no-deps deepspeed==%s (docs/development.md, 'DeepSpeed from "
                "source')", name, OPS[name][2], OPS[name][3], jit_build_dir(name), switches,
                _deepspeed_version())
    return pending


def build_pending(names: list[str] | None = None) -> list[str]:
    """Compile (DeepSpeed's JIT, into the torch extensions cache) those of ``names`` (default:
    all of :data:`OPS`) that would otherwise be compiled by the first run that loads them; returns
    their names. For a caller without a time limit, e.g. before timed runs."""
    from deepspeed.accelerator import get_accelerator

    pending = pending_builds(list(OPS) if names is None else names)
    for name in pending:
        log.warning("compiling DeepSpeed's C++ op %s (%s) into %s, once", name, OPS[name][2],
                    jit_build_dir(name))
        get_accelerator().create_op_builder(OPS[name][0]).load(verbose=False)
    return pending


def note_export_dtype(cfg: Any, engine: str, model: Any) -> None:
    """Say (main process) that DeepSpeed exports bfloat16 weights when the recipe said float32.

    DeepSpeed's bf16 engine (``run.mixed_precision: bf16``) casts the model itself to bfloat16 and
    keeps fp32 weights only as the optimizer's master copy, so the exported ``final/`` is bfloat16
    whatever ``model.dtype`` says (docs/janus.md, "Dtype")."""
    if engine != "deepspeed" or cfg.model.dtype == "bfloat16":
        return
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    import torch

    if torch.bfloat16 in dtypes and int(os.environ.get("RANK", "0")) == 0:
        log.warning("exporting the model in bfloat16 although model.dtype=%s: DeepSpeed's bf16 "
                    "engine (run.mixed_precision=%s) holds the model in bfloat16, and its fp32 "
                    "weights are the optimizer's master copy (docs/janus.md, 'Dtype'); "
                    "from_pretrained(..., torch_dtype=torch.float32) upcasts it",
                    cfg.model.dtype, cfg.run.mixed_precision)


if __name__ == "__main__":
    # `python -m stagerl.ds_ops --check` (the Makefile): exit 1 when a run would compile an op.
    if sys.argv[1:] != ["--check"]:
        sys.exit("usage: python -m stagerl.ds_ops --check")
    sys.exit(1 if pending_builds(list(OPS)) else 0)
