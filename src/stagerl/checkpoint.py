"""Atomic checkpoints and exact resume.

Run directories (``run.out_dir / run.name``) hold one run each: :func:`resolve_run_dir` refuses a
second run into a folder that holds one, unless it resumes.

A checkpoint is a directory ``checkpoints/step_000123/`` holding accelerate's state (weights as
safetensors, optimizer, scheduler, every process's RNG states), ``trainer_state.json`` (step, data
position, skip counter) and the resolved ``config.yaml``. It is written under a temporary name and
renamed into place only once complete, after a ``COMPLETE`` marker is written inside it: a kill
during a save leaves at most a ``*.tmp`` directory, which resume ignores (and the next save removes).

Checkpoints never lie (docs/janus.md, "Checkpoints and resume"):
- Every rank writes ``manifest_rank<r>.json`` (size and a sampled digest of each file it sees in
  the checkpoint); the main rank verifies every rank's manifest and files in *its* view of the
  folder before writing ``COMPLETE``. A rank whose files are not there (machines without a shared
  filesystem) stops the save on every rank with one line.
- :func:`check_shared_run_dir` finds a run folder that is not shared between machines as soon as
  the process group exists, before the engine starts; :func:`agreed_resume_point` makes every rank
  resume from the same step or stop.
- ``run_info.json`` (engine, world size, ZeRO stage, precision, LoRA) is written in the run folder
  and in each checkpoint; :func:`check_resume` compares it with the launch before the model loads.
- :func:`consolidated_state_dict` turns a step folder of any engine into a full state dict on the
  CPU, so every checkpoint can be evaluated.
- LoRA runs checkpoint adapters only (:func:`adapter_only_checkpoints`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stagerl import distributed
from stagerl.config_schema import Config
from stagerl.errors import UserError
from stagerl.preflight import check_output_dir

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
RUN_INFO = "run_info.json"
_MANIFEST = "manifest_rank{}.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps completed (= rollouts consumed)
    data_position: int = 0  # prompts consumed from the source (global, all processes)
    consecutive_skips: int = 0
    total_skips: int = 0
    no_signal_steps: int = 0  # consecutive steps whose rollout carried no reward signal


def save_checkpoint(accelerator: Accelerator, ckpt_root: Path, state: TrainerState,
                    config_yaml: str, keep_last: int = 2, info: dict[str, Any] | None = None,
                    save_kwargs: dict[str, Any] | None = None) -> Path:
    """Save on every process (accelerate writes each rank's RNG state, DeepSpeed each rank's
    shards); the main process verifies that every rank's part is in its view of the folder, then
    marks it complete and renames it. A part that is missing stops every rank with one line."""
    final = Path(ckpt_root) / f"step_{state.step:06d}"
    tmp = Path(ckpt_root) / f"step_{state.step:06d}.tmp"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    tmp.mkdir(parents=True, exist_ok=True)  # a rank on another machine writes its own copy
    accelerator.save_state(str(tmp), safe_serialization=True, **(save_kwargs or {}))
    accelerator.wait_for_everyone()
    rank = accelerator.process_index
    manifest = {"rank": rank, "host": socket.gethostname(), "files": _file_table(tmp)}
    (tmp / _MANIFEST.format(rank)).write_text(json.dumps(manifest, indent=1))
    accelerator.wait_for_everyone()
    manifests = _all_ranks(accelerator, manifest)
    problem = None
    if main:
        problem = verify_parts(tmp, manifests)
        if problem is None:
            (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1))
            (tmp / "config.yaml").write_text(config_yaml)
            if info is not None:
                (tmp / RUN_INFO).write_text(json.dumps(info, indent=1))
            with open(tmp / MARKER, "w") as fh:
                fh.write("ok\n")
                fh.flush()
                os.fsync(fh.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _prune(Path(ckpt_root), keep_last)
    problem = _from_main(accelerator, problem)
    if problem is not None:
        raise UserError(f"checkpoint {final} is incomplete: {problem}; a run on several machines "
                        f"needs run.out_dir on a filesystem they all share")
    accelerator.wait_for_everyone()
    return final


def _file_table(folder: Path) -> dict[str, list[Any]]:
    """{relative path: [size, sampled digest]} of every file under ``folder`` (manifests aside)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not re.fullmatch(r"manifest_rank\d+\.json", rel):
            out[rel] = [p.stat().st_size, _sampled_digest(p)]
    return out


def _sampled_digest(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's size, first and last MiB: constant cost per file (a 7B shard is not read
    through), and enough to tell a file from a truncated, missing or different one."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(chunk))
        if size > chunk:
            fh.seek(max(chunk, size - chunk))
            h.update(fh.read(chunk))
    return h.hexdigest()


def verify_parts(folder: Path, manifests: list[dict[str, Any]], wait_s: float = 10.0) -> str | None:
    """None when every rank's manifest and every file it lists are in ``folder`` (this rank's view)
    with the same size and digest; else what is missing. Waits up to ``wait_s`` for a network
    filesystem to show files another machine has just written."""
    deadline = time.monotonic() + wait_s
    while True:
        problem = _first_missing(folder, manifests)
        if problem is None or time.monotonic() >= deadline:
            return problem
        time.sleep(0.5)


def _first_missing(folder: Path, manifests: list[dict[str, Any]]) -> str | None:
    for m in sorted(manifests, key=lambda m: m["rank"]):
        where = f"rank {m['rank']} (host {m['host']})"
        if not (folder / _MANIFEST.format(m["rank"])).is_file():
            return f"{where} wrote its part where the main rank cannot see it"
        for rel, (size, digest) in m["files"].items():
            p = folder / rel
            if not p.is_file():
                return f"{rel} of {where} is missing"
            if p.stat().st_size != size or _sampled_digest(p) != digest:
                return f"{rel} of {where} differs from what that rank wrote"
    return None


def _all_ranks(accelerator: Accelerator, obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order, on every rank (a collective)."""
    if accelerator.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return list(gather_object([obj]))


def _from_main(accelerator: Accelerator, obj: Any) -> Any:
    """The main rank's ``obj`` on every rank (a collective)."""
    if accelerator.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj], from_process=0)[0]


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint, or None. Partial (``.tmp`` or marker-less) dirs are ignored."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return None
    done = [(int(m.group(1)), p) for p in root.iterdir()
            if (m := _STEP_DIR.match(p.name)) and (p / MARKER).is_file()]
    return max(done)[1] if done else None


def load_checkpoint(accelerator: Accelerator, path: Path, engine: str = "single",
                    adapters_only: bool = False) -> TrainerState:
    """Restore the run's state. A LoRA checkpoint holds the adapters only: the base weights are
    the ones just loaded from ``model.path``, so loading is not strict about them."""
    kwargs: dict[str, Any] = {}
    if adapters_only:
        kwargs = {"load_module_strict": False} if engine == "deepspeed" else {"strict": False}
    accelerator.load_state(str(path), **kwargs)
    return TrainerState(**json.loads((Path(path) / "trainer_state.json").read_text()))


def _prune(root: Path, keep_last: int) -> None:
    done = sorted((int(m.group(1)), p) for p in root.iterdir()
                  if (m := _STEP_DIR.match(p.name)) and (p / MARKER).is_file())
    for _, p in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


def checkpoint_step(path: Path) -> int:
    """The step a complete checkpoint was saved at (from its trainer_state.json)."""
    try:
        return int(json.loads((Path(path) / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        m = _STEP_DIR.match(Path(path).name)
        return int(m.group(1)) if m else 0


# --------------------------------------------------------------------------------------------------
# Run directories: one run per folder


RUN_FILES = ("metrics.jsonl", "config.yaml", "checkpoints", "final")


def holds_run(path: Path) -> bool:
    """True when ``path`` already holds (part of) a training run."""
    return any((Path(path) / f).exists() for f in RUN_FILES)


def default_run_name(preset: str | None, seed: int) -> str:
    return f"{preset or 'custom'}-seed{seed}"


def resolve_run_dir(run: Any, preset: str | None) -> Path:
    """``run.out_dir / run.name`` (config section ``run``), checked before anything is written:
    the name must stay inside ``run.out_dir``, the folder must be writable, and an existing run is
    refused unless ``run.resume`` (runs never mix). Nothing is created here."""
    name = str(run.name) or default_run_name(preset, run.seed)
    out = Path(str(run.out_dir))
    path = out / name
    if Path(name).is_absolute() or ".." in Path(name).parts or os.path.normpath(name) == ".":
        raise UserError(f"run.name={run.name!r}: a run name is a folder inside run.out_dir "
                        f"({out}); it cannot be absolute, '.', or contain '..'")
    check_output_dir(out, "run.out_dir")
    if path.exists() and not path.is_dir():
        raise UserError(f"run.name={name!r}: {path} is a file, not a run folder")
    # Only the main process checks: the others may look after it has started writing.
    if not run.resume and holds_run(path) and int(os.environ.get("RANK", "0")) == 0:
        raise UserError(f"{path} already holds a run; continue it with --resume "
                        f"(run.resume=true), or choose another run.name, or delete the folder")
    return path


# --------------------------------------------------------------------------------------------------
# Several machines: one run folder, one resume step


def check_shared_run_dir(accelerator: Accelerator, run_dir: Path, out_dir: str) -> None:
    """Stop every rank with one line when some rank cannot see what the main rank writes in the
    run folder (machines without a shared filesystem): a collective, called once the process
    group exists and before the engine starts, so no rank trains or saves a part nobody finds."""
    if accelerator.num_processes == 1:
        return
    token = _from_main(accelerator, f".shared_check_{uuid.uuid4().hex}")
    probe = Path(run_dir) / token
    if accelerator.is_main_process:
        probe.write_text(socket.gethostname())
    accelerator.wait_for_everyone()
    deadline = time.monotonic() + 10.0  # a network filesystem may show the file late
    while not probe.is_file() and time.monotonic() < deadline:
        time.sleep(0.5)
    seen = _all_ranks(accelerator, (accelerator.process_index, socket.gethostname(),
                                    probe.is_file()))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        probe.unlink(missing_ok=True)
    blind = [(r, host) for r, host, ok in seen if not ok]
    if blind:
        r, host = blind[0]
        if not probe.is_file() and accelerator.is_local_main_process:
            with_run_files = holds_run(run_dir)
            if not with_run_files:  # the folder this machine created for nothing
                shutil.rmtree(run_dir, ignore_errors=True)
        raise UserError(f"run.out_dir={out_dir}: rank {r} (host {host}) cannot see the run "
                        f"folder {Path(run_dir).resolve()} that rank 0 writes; a run on several "
                        f"machines needs run.out_dir on a filesystem they all share (checkpoints "
                        f"hold every rank's part)")


def agreed_resume_point(accelerator: Accelerator, ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint, the same on every rank; ranks that would start at
    different steps stop with one line instead (a collective)."""
    ckpt = latest_checkpoint(ckpt_root)
    step = checkpoint_step(ckpt) if ckpt is not None else -1
    found = _all_ranks(accelerator, (accelerator.process_index, step))
    steps = {s for _, s in found}
    if len(steps) > 1:
        what = ", ".join(f"rank {r}: {'none' if s < 0 else f'step {s}'}" for r, s in found)
        raise UserError(f"run.resume: the ranks find different checkpoints in {ckpt_root} "
                        f"({what}); a run on several machines needs run.out_dir on a filesystem "
                        f"they all share")
    return ckpt


# --------------------------------------------------------------------------------------------------
# The run record: engine, world size, precision, LoRA


def current_run_info(cfg: Config) -> dict[str, Any]:
    """What this launch is, from the environment ``accelerate launch``/``torchrun`` wrote (no
    process group needed, so the preflight can compare it before the model loads)."""
    return {"engine": distributed.detect_engine(),
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "zero_stage": distributed.zero_stage(),
            "mixed_precision": cfg.run.mixed_precision,
            "lora": bool(cfg.model.lora)}


def read_run_info(folder: Path) -> dict[str, Any] | None:
    """The run record of a checkpoint or run folder; None when absent (older runs) or unreadable."""
    try:
        return json.loads((Path(folder) / RUN_INFO).read_text())
    except (OSError, ValueError):
        return None


def write_run_info(run_dir: Path, info: dict[str, Any]) -> None:
    (Path(run_dir) / RUN_INFO).write_text(json.dumps(info, indent=1))


# Engines whose checkpoint is one full copy of the weights and optimizer (accelerate's files):
# a run saved by one of them resumes under any of them, with any process count.
_PORTABLE = ("single", "ddp")


def _launch_name(info: dict[str, Any]) -> str:
    engine = info.get("engine", "?")
    if engine == "deepspeed":
        engine = f"DeepSpeed ZeRO-{info.get('zero_stage', '?')}"
    return f"{engine} on {info.get('world_size', '?')} process(es)"


def check_resume(cfg: Config, run_dir: Path) -> None:
    """Before the model loads: with ``run.resume`` there must be a checkpoint to continue from
    (unless ``run.resume_or_start``), and this launch must be able to load it."""
    if not cfg.run.resume:
        return
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt = latest_checkpoint(ckpt_root)
    if ckpt is None:
        if cfg.run.resume_or_start:
            return
        where = ("does not exist" if not Path(run_dir).exists() else
                 "holds no complete checkpoint")
        raise UserError(f"run.resume=true: {run_dir} {where} (check run.out_dir and run.name); "
                        f"set run.resume_or_start=true to start from step 0 when there is nothing "
                        f"to resume")
    saved = read_run_info(ckpt)
    if saved is None:
        return  # saved before runs were recorded: nothing to compare
    now = current_run_info(cfg)
    portable = saved.get("engine") in _PORTABLE and now["engine"] in _PORTABLE
    same = (saved.get("engine"), saved.get("zero_stage"), saved.get("world_size")) == \
        (now["engine"], now["zero_stage"], now["world_size"])
    if not (portable or same):
        hint = ("launch it the same way (the same accelerate launch file and num_processes)"
                if saved.get("engine") == now["engine"] else
                "launch it with the same accelerate launch file")
        raise UserError(f"run.resume: {ckpt} was saved by {_launch_name(saved)}, this launch is "
                        f"{_launch_name(now)}; a sharded checkpoint resumes only as it was saved: "
                        f"{hint}")
    if saved.get("mixed_precision") != now["mixed_precision"]:
        raise UserError(f"run.mixed_precision={now['mixed_precision']} but {ckpt} was saved with "
                        f"run.mixed_precision={saved.get('mixed_precision')}; a resumed run keeps "
                        f"its precision")
    if bool(saved.get("lora")) != now["lora"]:
        raise UserError(f"model.lora={str(now['lora']).lower()} but {ckpt} was saved with "
                        f"model.lora={str(bool(saved.get('lora'))).lower()}")


# --------------------------------------------------------------------------------------------------
# Every checkpoint evaluable: one full state dict from any engine's step folder


def consolidated_state_dict(step_dir: Path) -> dict[str, torch.Tensor]:
    """The policy's weights saved in a ``checkpoints/step_N`` folder, as one state dict on the CPU
    (offline: no process group, no GPU).

    - single / DDP: accelerate's ``model.safetensors``;
    - DeepSpeed ZeRO-2/3: the per-rank shards under ``pytorch_model/``, merged by DeepSpeed's own
      ``zero_to_fp32`` reader (fp32 master weights);
    - FSDP2: the full state this project gathers at each save (``custom_checkpoint_<i>.pkl``,
      see ``stagerl.distributed``), its ``model`` part.

    A LoRA run's checkpoint holds the adapters (trainable weights) only.
    """
    step_dir = Path(step_dir)
    safe = step_dir / "model.safetensors"
    if safe.is_file():
        from safetensors.torch import load_file

        sd = load_file(str(safe))
        if sd and all(k.startswith("module.") for k in sd):
            sd = {k[len("module."):]: v for k, v in sd.items()}
        return sd
    if (step_dir / "pytorch_model").is_dir():
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError:
            raise UserError(f"{step_dir}: a DeepSpeed checkpoint; reading it needs the "
                            f"'deepspeed' extra") from None
        said = io.StringIO()  # the reader print()s its progress: to the log, not stdout
        with contextlib.redirect_stdout(said):
            sd = dict(get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag="pytorch_model"))
        log.debug("%s", said.getvalue().strip())
        return sd
    for pkl in sorted(step_dir.glob("custom_checkpoint_*.pkl")):
        state = torch.load(str(pkl), map_location="cpu", weights_only=True, mmap=True)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            return {k: v for k, v in state["model"].items() if isinstance(v, torch.Tensor)}
    raise UserError(f"{step_dir}: no model weights (no model.safetensors, no DeepSpeed "
                    f"pytorch_model/, no FSDP2 full state)")


# --------------------------------------------------------------------------------------------------
# LoRA: adapters only


def trainable_names(module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


def adapter_only_checkpoints(accelerator: Accelerator, engine: str) -> dict[str, Any]:
    """Make a LoRA run's checkpoints hold its trainable weights (the adapters) only, plus their
    optimizer state (which covers nothing else). Returns the extra ``save_state`` arguments.

    The frozen base is what ``model.path`` holds and is loaded again on resume. DeepSpeed writes
    its own files (``exclude_frozen_parameters``); the other engines' weights pass through
    accelerate's save hook, which drops the frozen ones.
    """
    if engine == "deepspeed":
        return {"exclude_frozen_parameters": True}

    def keep_trainable(models: list[torch.nn.Module], weights: list[dict[str, Any]],
                       output_dir: str) -> None:
        for model, sd in zip(models, weights):
            keep = trainable_names(accelerator.unwrap_model(model))
            for key in [k for k in sd if k not in keep]:
                del sd[key]

    accelerator.register_save_state_pre_hook(keep_trainable)
    return {}
