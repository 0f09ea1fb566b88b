"""Atomic checkpoints and exact resume.

Run directories (``run.out_dir / run.name``) hold one run each: :func:`resolve_run_dir` refuses a
second run into a folder that holds one, unless it resumes.

A checkpoint is a directory ``checkpoints/step_000123/`` holding accelerate's state (weights as
safetensors, optimizer, scheduler, every process's RNG states), ``trainer_state.json`` (step, data
position, skip counter) and the resolved ``config.yaml``. It is written under a temporary name and
renamed into place only once complete, after a ``COMPLETE`` marker is written inside it: a kill
during a save leaves at most a ``*.tmp`` directory, which resume ignores (and the next save removes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stagerl.errors import UserError
from stagerl.preflight import check_output_dir

if TYPE_CHECKING:
    from accelerate import Accelerator

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps completed (= rollouts consumed)
    data_position: int = 0  # prompts consumed from the source (global, all processes)
    consecutive_skips: int = 0
    total_skips: int = 0
    no_signal_steps: int = 0  # consecutive steps whose rollout carried no reward signal


def save_checkpoint(accelerator: Accelerator, ckpt_root: Path, state: TrainerState,
                    config_yaml: str, keep_last: int = 2) -> Path:
    """Save on every process (accelerate writes each rank's RNG state); rename on the main one."""
    final = Path(ckpt_root) / f"step_{state.step:06d}"
    tmp = Path(ckpt_root) / f"step_{state.step:06d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1))
        (tmp / "config.yaml").write_text(config_yaml)
        with open(tmp / MARKER, "w") as fh:
            fh.write("ok\n")
            fh.flush()
            os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(Path(ckpt_root), keep_last)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint, or None. Partial (``.tmp`` or marker-less) dirs are ignored."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return None
    done = [(int(m.group(1)), p) for p in root.iterdir()
            if (m := _STEP_DIR.match(p.name)) and (p / MARKER).is_file()]
    return max(done)[1] if done else None


def load_checkpoint(accelerator: Accelerator, path: Path) -> TrainerState:
    accelerator.load_state(str(path))
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
