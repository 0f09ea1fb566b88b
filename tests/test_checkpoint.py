"""Checkpoints that never lie (stagerl.checkpoint; docs/janus.md, "Checkpoints and resume"):
every rank's part verified before COMPLETE, two machines without a shared filesystem stopped before
training, the run record checked before the model loads, every step folder evaluable, LoRA
checkpoints holding adapters only."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stagerl.checkpoint import (MARKER, check_resume, consolidated_state_dict, read_run_info,
                                verify_parts)
from stagerl.config import load_config
from stagerl.errors import UserError
from stagerl.rewards.base import RewardOutput, register_reward

ROOT = Path(__file__).resolve().parents[1]

TINY = ["sampling.prompts_per_step=2", "sampling.group_size=2", "run.steps=2", "run.save_every=1",
        "log.eval_prompts=0", "log.tensorboard=false", "log.image_every=0", "log.progress=false",
        "run.name=r"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_machines(cwds: list[Path], model_dir: Path,
                  *extra: str) -> list[subprocess.CompletedProcess]:
    """One `torchrun --nnodes 2` per simulated machine (1 process each) on 127.0.0.1, each in its
    own working directory, so that the relative run.out_dir is a different folder per machine
    unless both share one."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = []
    for rank, cwd in enumerate(cwds):
        cwd.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
               str(rank), "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port",
               str(port), "-m", "stagerl", "train", f"model.path={model_dir}", "run.out_dir=runs",
               *TINY, *extra]
        procs.append(subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def test_two_machines_without_shared_filesystem_stop_before_training(tmp_path, tiny_model_dir):
    runs = _two_machines([tmp_path / "m0", tmp_path / "m1"], tiny_model_dir)
    for r in runs:
        # Each machine's rank exits 2 with one line: rank 0 prints it, every rank leaves it in
        # torchrun's failure summary (stagerl.cli).
        assert r.returncode != 0 and "exitcode  : 2" in r.stderr, r.stderr[-3000:]
        errors = {l[l.index("stagerl: error:"):] for l in r.stderr.splitlines()
                  if "stagerl: error:" in l}
        assert len(errors) == 1, r.stderr[-3000:]
        line = errors.pop()
        assert "run.out_dir=runs" in line and "filesystem they all share" in line, line
    assert "step" not in runs[0].stdout  # stopped before the first step
    for m in ("m0", "m1"):  # nothing trained, nothing saved, no run folder left
        assert not (tmp_path / m / "runs" / "r").exists()


def test_two_machines_sharing_the_run_folder_train_and_resume(tmp_path, tiny_model_dir):
    shared = tmp_path / "shared"
    runs = _two_machines([shared, shared], tiny_model_dir)
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr[-3000:] + runs[1].stderr[-3000:]
    ckpt = shared / "runs" / "r" / "checkpoints" / "step_000002"
    assert (ckpt / MARKER).is_file()
    for rank in (0, 1):  # both ranks' parts, each listed in its manifest
        manifest = json.loads((ckpt / f"manifest_rank{rank}.json").read_text())
        assert f"random_states_{rank}.pkl" in manifest["files"]
    info = read_run_info(ckpt)
    assert info["engine"] == "ddp" and info["world_size"] == 2 and info["lora"] is False
    assert read_run_info(shared / "runs" / "r") == info
    # both ranks resume from the same step
    runs = _two_machines([shared, shared], tiny_model_dir, "run.steps=3", "--resume")
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr[-3000:]
    rows = [json.loads(l) for l in
            (shared / "runs" / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def _manifest(rank: int, files: dict) -> dict:
    return {"rank": rank, "host": "h", "files": files}


def test_the_main_rank_verifies_every_ranks_part(tmp_path):
    from stagerl.checkpoint import _file_table

    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    (tmp_path / "manifest_rank0.json").write_text("{}")
    table = _file_table(tmp_path)
    assert list(table) == ["a.bin"]
    good = [_manifest(0, table)]
    assert verify_parts(tmp_path, good, wait_s=0) is None
    # rank 1's manifest is not in this view of the folder (another machine's disk)
    missing = verify_parts(tmp_path, good + [_manifest(1, {})], wait_s=0)
    assert missing is not None and "rank 1" in missing
    (tmp_path / "manifest_rank1.json").write_text("{}")
    lost = _manifest(1, {"random_states_1.pkl": [3, "d"]})
    assert "random_states_1.pkl" in verify_parts(tmp_path, good + [lost], wait_s=0)
    (tmp_path / "a.bin").write_bytes(b"x" * 9)  # truncated after the rank listed it
    assert "a.bin" in verify_parts(tmp_path, good, wait_s=0)


def _cfg(out: Path, *extra: str):
    return load_config(None, [f"run.out_dir={out}", "run.name=r", *extra])


def _fake_checkpoint(run: Path, info: dict | None) -> Path:
    ckpt = run / "checkpoints" / "step_000002"
    ckpt.mkdir(parents=True)
    (ckpt / MARKER).write_text("ok\n")
    (ckpt / "trainer_state.json").write_text('{"step": 2}')
    if info is not None:
        (ckpt / "run_info.json").write_text(json.dumps(info))
    return ckpt


DS2 = {"engine": "deepspeed", "world_size": 2, "zero_stage": 2, "mixed_precision": "no",
       "lora": False}


@pytest.mark.parametrize("env, extra, phrase", [
    ({}, [], "DeepSpeed ZeRO-2 on 2 process(es), this launch is single on 1"),  # no launch file
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
      "WORLD_SIZE": "4"}, [], "this launch is DeepSpeed ZeRO-2 on 4"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
      "WORLD_SIZE": "2"}, [], "ZeRO-3"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
      "WORLD_SIZE": "2"}, ["run.mixed_precision=bf16"], "run.mixed_precision=bf16"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
      "WORLD_SIZE": "2"}, ["model.lora=true"], "model.lora=true"),
])
def test_resume_that_cannot_load_the_checkpoint_is_refused_before_the_model(
        tmp_path, monkeypatch, env, extra, phrase):
    for k in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "WORLD_SIZE",
              "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    _fake_checkpoint(tmp_path / "r", DS2)
    with pytest.raises(UserError) as err:
        check_resume(_cfg(tmp_path, "run.resume=true", *extra), tmp_path / "r")
    assert phrase in str(err.value)
    # the same launch as the save passes
    for k, v in {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
                 "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    check_resume(_cfg(tmp_path, "run.resume=true"), tmp_path / "r")


def test_single_and_ddp_checkpoints_resume_with_any_process_count(tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    _fake_checkpoint(tmp_path / "r", {**DS2, "engine": "ddp", "zero_stage": 0, "world_size": 4})
    for world in ("1", "2"):
        monkeypatch.setenv("WORLD_SIZE", world)
        check_resume(_cfg(tmp_path, "run.resume=true"), tmp_path / "r")


def test_resume_with_nothing_to_resume_names_the_folder(tmp_path, tiny_model_dir, capsys):
    from stagerl.cli import main

    argv = ["train", f"model.path={tiny_model_dir}", f"run.out_dir={tmp_path}", *TINY,
            "run.name=typo", "--resume"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "run.resume=true" in err and str(tmp_path / "typo") in err and "does not exist" in err
    assert not (tmp_path / "typo").exists()
    # asked for explicitly: start fresh
    assert main(argv + ["run.resume_or_start=true", "run.steps=1"]) == 0
    assert (tmp_path / "typo" / "checkpoints" / "step_000001" / MARKER).is_file()


def test_every_step_folder_is_evaluable(tmp_path, tiny_model_dir):
    """single/DDP: model.safetensors, also under DDP's key prefix; a folder without weights is one
    line. (DeepSpeed and FSDP2 step folders: tests/test_engines.py.)"""
    from safetensors.torch import save_file

    from stagerl.cli_eval import _load_weights
    from stagerl.policies import build_policy

    cfg = load_config(None, [f"model.path={tiny_model_dir}"])
    policy = build_policy(cfg.model, need_reference=False).policy
    trained = {k: v + 1.0 for k, v in policy.state_dict().items()}
    step = tmp_path / "step_000001"
    step.mkdir()
    save_file({f"module.{k}": v.contiguous() for k, v in trained.items()},
              str(step / "model.safetensors"))
    assert set(consolidated_state_dict(step)) == set(trained)
    _load_weights(policy, step / "model.safetensors")
    assert all(torch.equal(policy.state_dict()[k], trained[k]) for k in trained)
    half = dict(list(trained.items())[:1])
    save_file(half, str(step / "model.safetensors"))
    with pytest.raises(UserError, match="do not fit"):
        _load_weights(policy, step)


@register_reward("ckpt_brightness")
class _Brightness:
    """Mean pixel value: continuous, so groups are never tied."""

    name = "ckpt_brightness"

    def __call__(self, images, prompts, metadata):
        vals = [float(np.asarray(im, dtype=np.float32).mean() / 255.0) for im in images]
        return RewardOutput(torch.tensor(vals), torch.ones(len(vals), dtype=torch.bool))


def _lora_cfg(out: Path, *extra: str):
    return load_config(str(ROOT / "configs" / "janus_tiny_test.yaml"), [
        "reward.names=[ckpt_brightness]", f"run.out_dir={out}", "run.name=r", "log.image_every=0",
        "optim.lr=1e-2", "model.lora=true", "model.lora_r=4", "run.save_every=1", *extra])


def test_lora_checkpoints_hold_adapters_only_and_resume_exactly(tmp_path):
    from safetensors.torch import load_file

    from stagerl.cli_eval import _load_weights
    from stagerl.policies import build_policy
    from stagerl.trainer import train

    full = train(_lora_cfg(tmp_path / "a", "run.steps=3"))
    trained = {k: v.clone() for k, v in full.policy.state_dict().items()}
    ckpt = full.run_dir / "checkpoints" / "step_000003"
    saved = load_file(str(ckpt / "model.safetensors"))
    adapters = {n for n, p in full.policy.named_parameters() if p.requires_grad}
    assert set(saved) == adapters and all("lora_" in k for k in saved)
    whole = sum(v.numel() * v.element_size() for v in trained.values())
    size = (ckpt / "model.safetensors").stat().st_size
    assert size < whole / 5, (size, whole)  # the tiny model: ~1/50; Janus-Pro-7B: MBs, not GBs
    assert read_run_info(ckpt)["lora"] is True

    # resume from step 2 (adapters + their optimizer state) ends where the full run ended
    partial = tmp_path / "b"
    shutil.copytree(tmp_path / "a", partial)
    shutil.rmtree(partial / "r" / "checkpoints" / "step_000003")
    shutil.rmtree(partial / "r" / "final")
    again = train(_lora_cfg(partial, "run.steps=3", "run.resume=true"))
    assert again.steps == 3
    resumed = again.policy.state_dict()
    assert all(torch.equal(resumed[k], trained[k]) for k in adapters)

    # the adapter-only step folder is evaluable: the config's base + the saved adapters
    cfg = load_config(str(ckpt / "config.yaml"), [])
    policy = build_policy(cfg.model, need_reference=False).policy
    _load_weights(policy, ckpt)
    got = policy.state_dict()
    assert all(torch.equal(got[k], trained[k]) for k in trained)


def test_ranks_that_find_different_checkpoints_stop_instead_of_hanging(tmp_path, monkeypatch):
    """What two machines with their own disks see on --resume: rank 0 a step-2 checkpoint, rank 1
    none. Every rank gets the same gathered view and stops with one line."""
    import stagerl.checkpoint as ckpt_mod

    class _Acc:
        num_processes, process_index = 2, 0

    _fake_checkpoint(tmp_path / "r", None)
    monkeypatch.setattr(ckpt_mod, "_all_ranks", lambda acc, obj: [obj, (1, -1)])
    with pytest.raises(UserError, match="rank 0: step 2, rank 1: none"):
        ckpt_mod.agreed_resume_point(_Acc(), tmp_path / "r" / "checkpoints")
    monkeypatch.setattr(ckpt_mod, "_all_ranks", lambda acc, obj: [obj, (1, 2)])
    assert ckpt_mod.agreed_resume_point(_Acc(), tmp_path / "r" / "checkpoints").name == \
        "step_000002"
