"""LlamaGen under the multi-process engines on CPU (DDP, ZeRO-2, ZeRO-3, FSDP2): 2 processes with
gloo through ``accelerate launch`` and the shipped launch files, against a 1-process run with the
same global batch.

The tiny random LlamaGen t2i is saved in stagerl's format and loaded by path; each run trains 3
steps with the reference model, KL, the entropy reward and ``logprob_chunk`` on. Then both ranks
hold the same (gathered) parameters, and they match the 1-process run within ~1e-3 of one step's
size (the same tolerance, and the same reasoning, as tests/test_engines.py for Janus); the gradient
norm and the loss agree to 1e-4; the exported folder loads back and samples.

Run as a script (alone or under ``accelerate launch``) this file is the worker:
argv OUT_DIR MODEL_DIR [dotted overrides...].
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = {"ddp": "ddp", "zero2": "deepspeed_zero2", "zero3": "deepspeed_zero3", "fsdp2": "fsdp"}


def _worker(out: str, model_dir: str, overrides: list[str]) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    from engine_run import run_and_report  # the Janus engine tests' worker, on another config

    run_and_report("llamagen_tiny_test.yaml", out, model_dir, overrides)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from stagerl.policies.llamagen import tiny_random

    path = tmp_path_factory.mktemp("llamagen_ckpt")
    tiny_random("t2i").save_pretrained(str(path))
    return path


def _run(out: Path, model_dir: Path, engine: str | None, *overrides: str) -> dict:
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = [str(Path(__file__)), str(out), str(model_dir), *overrides]
    if engine is None:
        cmd = [sys.executable, *args]
    else:
        launch = yaml.safe_load((ROOT / "configs" / "accelerate" / f"{LAUNCH[engine]}.yaml")
                                .read_text())
        launch.update(num_processes=2, mixed_precision="no")
        launch.pop("gpu_ids", None)
        launch_file = out / "launch.yaml"
        launch_file.write_text(yaml.safe_dump(launch))
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(launch_file), "--main_process_port", "0", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    rows = [json.loads(l) for l in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"ranks": ranks, "params": torch.load(out / "params0.pt"), "rows": rows, "out": out}


@pytest.fixture(scope="module")
def single(model_dir, tmp_path_factory):
    return _run(tmp_path_factory.mktemp("single"), model_dir, None)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3", "fsdp2"])
def test_two_processes_match_one(engine, model_dir, single, tmp_path):
    pytest.importorskip("deepspeed") if engine.startswith("zero") else None
    from safetensors.torch import load_file

    from stagerl.policies.llamagen import from_pretrained
    from stagerl.policies.base import SamplingParams

    run = _run(tmp_path / "a", model_dir, engine)
    assert [r["world"] for r in run["ranks"]] == [2, 2]
    assert run["ranks"][0]["digest"] == run["ranks"][1]["digest"], "ranks disagree"
    raw = load_file(str(model_dir / "model.safetensors"))
    init = {k: raw[k[len("model."):]].float() for k in single["params"]}
    a, b = single["params"], run["params"]
    assert set(a) == set(b) and all(k.startswith("model.") for k in a)
    step = max(float((a[k] - init[k]).abs().max()) for k in a)
    gap = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert step > 1e-3 and gap / step < 1e-3, (gap, step)
    for r1, r2 in zip(single["rows"], run["rows"]):
        assert r2["optim/grad_norm"] == pytest.approx(r1["optim/grad_norm"], rel=1e-4)
        assert r2["loss/total"] == pytest.approx(r1["loss/total"], rel=1e-4, abs=1e-7)
    policy = from_pretrained(str(run["out"] / "run" / "final"))
    out = policy.sample(policy.encode_prompts(["a red circle"]), SamplingParams(cfg_scale=4.0),
                        generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == (1, 64) and torch.isfinite(out.logprobs).all()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], sys.argv[3:])
