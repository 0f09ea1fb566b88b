"""The engines Janus-Pro users train with, run for real on CPU: DDP, FSDP2, DeepSpeed ZeRO-2 and
ZeRO-3 (with and without optimizer offload), 2 processes with gloo, through ``accelerate launch``
and the shipped launch files (docs/janus.md, "Engines").

Each run trains the tiny Janus loaded from a saved ``from_pretrained`` folder for 3 steps with the
reference model, KL, entropy reward and ``logprob_chunk`` on. Then:
- both ranks hold the same (gathered) parameters;
- the trained parameters match a 1-process run with the same global batch. Sampling noise is drawn
  per prompt group (stagerl.policies.sampling), so both runs see the same rollouts; what may differ
  is the order of floating-point sums (the gradient all-reduce). Adam turns that rounding of
  near-zero gradients (eps 1e-8) into at most ~1e-3 of one step's size, the tolerance used. A
  gradient-averaging or normalisation bug moves whole updates (a factor of 1 or more), and a scale
  bug shows in the gradient norm, compared to 1e-4;
- the exported model loads with plain ``JanusForConditionalGeneration.from_pretrained`` and samples;
- resuming from the engine's checkpoint ends with the same parameters as the uninterrupted run;
- the same in bf16 weights (looser tolerances, justified in ``test_bf16``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("engine_run.py")
pytest.importorskip("deepspeed", reason="the 'deepspeed' extra is installed by `make test`")

LAUNCH = {"ddp": "ddp", "zero2": "deepspeed_zero2", "zero2_offload": "deepspeed_zero2_offload",
          "zero3": "deepspeed_zero3", "zero3_offload": "deepspeed_zero3_offload", "fsdp2": "fsdp"}


@pytest.fixture(scope="module")
def janus_dir(tmp_path_factory):
    """The tiny Janus saved as a checkpoint folder (what a 7B user points model.path at)."""
    from stagerl.policies.janus_tiny import build_tiny_janus

    path = tmp_path_factory.mktemp("janus_ckpt")
    model, processor = build_tiny_janus()
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path


def _launch_file(tmp: Path, engine: str, precision: str) -> Path:
    """The shipped launch file, resized to 2 processes and the run's precision."""
    d = yaml.safe_load((ROOT / "configs" / "accelerate" / f"{LAUNCH[engine]}.yaml").read_text())
    d.update(num_processes=2, mixed_precision=precision)
    d.pop("gpu_ids", None)
    path = tmp / f"{engine}-{precision}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def _interrupted_after_step2(out: Path, copy: Path) -> Path:
    """A copy of a finished 3-step run folder as a run killed after its step-2 checkpoint: the
    step-3 checkpoint, the final model and the ranks' reports removed."""
    shutil.copytree(out, copy)
    for p in list(copy.glob("rank*.json")) + list(copy.glob("params*.pt")):
        p.unlink()
    shutil.rmtree(copy / "run" / "checkpoints" / "step_000003")
    shutil.rmtree(copy / "run" / "final")
    return copy


def _run(out: Path, model_dir: Path, engine: str | None, *overrides: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    precision = "bf16" if "run.mixed_precision=bf16" in overrides else "no"
    args = [str(SCRIPT), str(out), str(model_dir), *overrides]
    if engine is None:
        cmd = [sys.executable, *args]
    else:
        launch = _launch_file(out.parent, engine, precision)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch),
               "--main_process_port", "0", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    ranks = sorted(out.glob("rank*.json"))
    info = [json.loads(p.read_text()) for p in ranks]
    params = torch.load(out / "params0.pt")
    rows = [json.loads(l) for l in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"ranks": info, "params": params, "rows": rows, "out": out}


@pytest.fixture(scope="module")
def single(janus_dir, tmp_path_factory):
    return _run(tmp_path_factory.mktemp("single"), janus_dir, None, "run.save_every=2")


@pytest.fixture(scope="module")
def single_bf16(janus_dir, tmp_path_factory):
    return _run(tmp_path_factory.mktemp("single_bf16"), janus_dir, None, "model.dtype=bfloat16",
                "run.mixed_precision=bf16")


def _step_relative_gap(a: dict, b: dict, init: dict) -> float:
    """max |θ_a − θ_b| / max |θ_a − θ_0| over the trained parameters."""
    gap = max(float((a[k] - b[k]).abs().max()) for k in a)
    step = max(float((a[k] - init[k]).abs().max()) for k in a)
    assert step > 1e-3, "training did not move the parameters"
    return gap / step


def _init(janus_dir: Path, keys) -> dict:
    from safetensors.torch import load_file

    raw = load_file(str(janus_dir / "model.safetensors"))
    return {k: raw[k[len("model."):]].float() for k in keys}


def _check_export_loads_and_samples(run_dir: Path) -> None:
    from transformers import JanusForConditionalGeneration

    from stagerl.policies.base import SamplingParams
    from stagerl.policies.janus import JanusPolicy, load_janus

    model = JanusForConditionalGeneration.from_pretrained(str(run_dir / "final"))
    assert model.dtype in (torch.float32, torch.bfloat16)
    model, processor = load_janus(str(run_dir / "final"), torch.float32)
    policy = JanusPolicy(model, processor)
    out = policy.sample(policy.encode_prompts(["a red circle"]), SamplingParams(cfg_scale=5.0),
                        generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == (1, policy.num_image_tokens)
    assert torch.isfinite(out.logprobs).all()


def _check_step_folder(step: Path, params: dict, ranks: list) -> None:
    """A step folder holds every rank's verified part and the run record, and is evaluable: its
    weights, consolidated offline on the CPU, are the trained ones."""
    from stagerl.checkpoint import MARKER, consolidated_state_dict, read_run_info

    assert (step / MARKER).is_file()
    assert sorted(p.name for p in step.glob("manifest_rank*.json")) == [
        "manifest_rank0.json", "manifest_rank1.json"]
    info = read_run_info(step)
    assert info["engine"] == ranks[0]["engine"] and info["world_size"] == 2
    state = consolidated_state_dict(step)
    gap = max(float((state[k].detach().float() - v).abs().max()) for k, v in params.items())
    assert gap <= 1e-6, gap


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3", "fsdp2"])
def test_engine_matches_one_process_exports_and_resumes(engine, janus_dir, single, tmp_path):
    run = _run(tmp_path / "a", janus_dir, engine, "run.save_every=2")
    ranks = run["ranks"]
    assert [r["world"] for r in ranks] == [2, 2]
    assert {r["engine"] for r in ranks} == {"ddp" if engine == "ddp" else
                                            "fsdp2" if engine == "fsdp2" else "deepspeed"}
    assert ranks[0]["digest"] == ranks[1]["digest"], "ranks disagree after training"
    init = _init(janus_dir, single["params"])
    assert _step_relative_gap(single["params"], run["params"], init) < 1e-3
    for r1, r2 in zip(single["rows"], run["rows"]):
        assert r2["optim/grad_norm"] == pytest.approx(r1["optim/grad_norm"], rel=1e-4)
        assert r2["loss/total"] == pytest.approx(r1["loss/total"], rel=1e-4, abs=1e-7)
    _check_export_loads_and_samples(run["out"] / "run")
    _check_step_folder(run["out"] / "run" / "checkpoints" / "step_000003", run["params"], ranks)

    # Resume: drop the last checkpoint, continue from step 2 to 3.
    resumed = _interrupted_after_step2(run["out"], tmp_path / "b")
    again = _run(resumed, janus_dir, engine, "run.save_every=2", "run.resume=true")
    assert again["ranks"][0]["digest"] == again["ranks"][1]["digest"]
    gap = max(float((again["params"][k] - run["params"][k]).abs().max()) for k in run["params"])
    assert gap <= 1e-6, f"resumed run ends {gap:.2e} away from the uninterrupted one"


@pytest.mark.slow
def test_zero2_lora_checkpoints_adapters_only_resume_and_evaluate(janus_dir, tmp_path):
    """ZeRO-2 + LoRA: DeepSpeed writes the adapters only (exclude_frozen_parameters), resume is
    exact, and the step folder loads into the base model built from its config."""
    from stagerl.checkpoint import consolidated_state_dict

    lora = ("model.lora=true", "model.lora_r=4", "run.save_every=2")
    run = _run(tmp_path / "a", janus_dir, "zero2", *lora)
    assert run["ranks"][0]["digest"] == run["ranks"][1]["digest"]
    step = run["out"] / "run" / "checkpoints" / "step_000003"
    _check_step_folder(step, run["params"], run["ranks"])
    state = consolidated_state_dict(step)
    assert set(run["params"]) <= set(state)
    frozen = [k for k in state if "lora_" not in k and k.endswith((".weight", ".bias"))]
    assert frozen == [], frozen[:3]  # no frozen base weight was written
    shards = sum(p.stat().st_size for p in (step / "pytorch_model").rglob("*") if p.is_file())
    assert shards < (janus_dir / "model.safetensors").stat().st_size / 5, shards
    resumed = _interrupted_after_step2(run["out"], tmp_path / "b")
    again = _run(resumed, janus_dir, "zero2", *lora, "run.resume=true")
    gap = max(float((again["params"][k] - run["params"][k]).abs().max()) for k in run["params"])
    assert gap <= 1e-6, f"resumed LoRA run ends {gap:.2e} away from the uninterrupted one"


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero2_offload", "zero3_offload"])
def test_deepspeed_optimizer_offload(engine, janus_dir, single, tmp_path):
    run = _run(tmp_path, janus_dir, engine)
    assert run["ranks"][0]["digest"] == run["ranks"][1]["digest"]
    init = _init(janus_dir, single["params"])
    # DeepSpeed's CPU Adam is a different Adam implementation (fused, its own rounding).
    assert _step_relative_gap(single["params"], run["params"], init) < 1e-2
    _check_export_loads_and_samples(run["out"] / "run")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3", "fsdp2"])
def test_bf16(engine, janus_dir, single_bf16, tmp_path):
    """bf16 weights (the 7B recipes): ranks agree, and the run follows the 1-process bf16 run.

    The first step sees the same rollout (sampling noise is per group) and must give the same loss
    and gradient norm to 1e-2. After the first update bf16 rounding (8 significant bits) differs
    between batch layouts, so rollouts drift apart in the 4th digit of the reward (measured) and
    the 3-step parameters differ by ~0.15-0.2 of the update's norm (measured); the check is
    ||θ_a − θ_b|| / ||θ_a − θ_0|| < 0.3. A gradient that is not averaged, or averaged wrongly,
    shows in the first step's gradient norm or in ranks that disagree.
    """
    over = ("model.dtype=bfloat16", "run.mixed_precision=bf16")
    run = _run(tmp_path, janus_dir, engine, *over)
    assert run["ranks"][0]["digest"] == run["ranks"][1]["digest"]
    first_1, first_2 = single_bf16["rows"][0], run["rows"][0]
    assert first_2["optim/grad_norm"] == pytest.approx(first_1["optim/grad_norm"], rel=1e-2)
    assert first_2["loss/total"] == pytest.approx(first_1["loss/total"], rel=1e-2, abs=1e-5)
    a, b = single_bf16["params"], run["params"]
    init = _init(janus_dir, a)
    gap = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5
    step = sum(float(((a[k] - init[k]) ** 2).sum()) for k in a) ** 0.5
    assert step > 1e-3 and gap / step < 0.3, (gap, step)
    _check_export_loads_and_samples(run["out"] / "run")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_sampling_gathers_weights_per_rollout_not_per_token(engine, janus_dir, tmp_path):
    """One rollout (sampling, teacher-forced log-probs, codes, decoding) under a sharding engine
    all-gathers the weights a bounded number of times, independent of the image length L."""
    script = Path(__file__).with_name("engine_gather_count.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launch = _launch_file(tmp_path, engine, "no")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch),
           "--main_process_port", "0", str(script), str(tmp_path), str(janus_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    counts = [json.loads((tmp_path / f"gathers{r}.json").read_text()) for r in (0, 1)]
    c = counts[0]
    # Bounded by the model's structure, not by the image length: FSDP2 gathers each sharded
    # unit (layers + root) once; ZeRO-3 gathers each parameter tensor once.
    bound = c["layers"] + 1 if c["engine"] == "fsdp2" else c["param_tensors"]
    assert 0 < c["per_rollout"] <= bound, c
    if "per_token" in c:  # ZeRO-3 without it: at least one gather per token
        assert c["per_token"] >= c["tokens"], c
    assert counts[0]["per_rollout"] == counts[1]["per_rollout"]


LAUNCH_ENV = {  # what `accelerate launch` writes into the environment for each launch file
    "zero3": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
    "fsdp": {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
}


@pytest.mark.parametrize("launch, env, overrides, phrase", [
    ("zero3", {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2"}, [], "optim.grad_accum=1"),
    ("zero3", {"ACCELERATE_GRADIENT_CLIPPING": "0.5"}, [], "optim.grad_clip=1.0"),
    ("zero3", {"ACCELERATE_MIXED_PRECISION": "bf16"}, [], "run.mixed_precision=no"),
    ("zero3", {}, ["model.lora=true"], "model.lora"),
    ("fsdp", {"FSDP_VERSION": "1"}, [], "fsdp_version: 1"),
    ("fsdp", {"FSDP_OFFLOAD_PARAMS": "true"}, [], "fsdp_offload_params"),
    ("fsdp", {}, ["model.kind=tiny", "model.path=builtin:shapes"], "model.kind=tiny"),
    (None, {}, ["model.path=NOT_JANUS"], "not a Janus checkpoint"),
])
def test_launch_that_contradicts_the_recipe_is_one_line_before_weights(
        launch, env, overrides, phrase, janus_dir, tmp_path):
    if "model.path=NOT_JANUS" in overrides:  # a model folder of another kind
        other = tmp_path / "other_model"
        other.mkdir()
        (other / "config.json").write_text('{"model_type": "llama"}')
        overrides = [f"model.path={other}"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **LAUNCH_ENV.get(launch, {}), **env}
    cmd = [sys.executable, "-m", "stagerl", "train", str(ROOT / "configs" / "janus_tiny_test.yaml"),
           f"model.path={janus_dir}", "model.tiny_random=false", f"run.out_dir={tmp_path / 'runs'}",
           *overrides]
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("stagerl: error:"), proc.stderr
    assert phrase in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()  # no litter
