"""The Janus path through the real trainer: configs/janus_tiny_test.yaml on a
tiny random Janus, in-process (full fine-tuning and LoRA) and as a 2-process gloo DDP run.

The shipped config scores with the exact shapes reward, which a random model almost never earns
(all groups tied, no gradient). Here a continuous test reward replaces it so that the update step
really moves the weights. Run as a script (under torchrun) this file is the DDP worker.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from stagerl.config import load_config
from stagerl.rewards.base import RewardOutput, register_reward

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "janus_tiny_test.yaml")
FROZEN = (".vision_model.", ".aligner.", ".vqmodel.", ".generation_embeddings.",
          ".generation_aligner.", ".generation_head.")


@register_reward("janus_test_brightness")
class Brightness:
    """Mean pixel value in [0, 1]: continuous, so groups are never tied."""

    name = "janus_test_brightness"

    def __call__(self, images, prompts, metadata):
        vals = [float(np.asarray(im, dtype=np.float32).mean() / 255.0) for im in images]
        return RewardOutput(torch.tensor(vals), torch.ones(len(vals), dtype=torch.bool))


def _cfg(out: str, *extra: str):
    return load_config(CONFIG, ["reward.names=[janus_test_brightness]", f"run.out_dir={out}",
                                "run.steps=2", "log.image_every=0", "optim.lr=1e-2", *extra])


def _digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()


def _spy(monkeypatch) -> dict:
    import stagerl.trainer as trainer_mod

    built: dict = {}
    real = trainer_mod.build_policy

    def spy(model_cfg, need_reference):
        pair = real(model_cfg, need_reference)
        built["pair"] = pair
        built["init"] = {k: v.detach().clone() for k, v in pair.policy.named_parameters()}
        return pair

    monkeypatch.setattr(trainer_mod, "build_policy", spy)
    return built


def test_trainer_full_finetune_changes_lm_only(tmp_path, monkeypatch) -> None:
    from transformers import JanusForConditionalGeneration

    from stagerl.trainer import train

    built = _spy(monkeypatch)
    # with the second teacher-forced pass, so that the sampling/teacher-forcing gap is logged
    result = train(_cfg(str(tmp_path), "sampling.reuse_sample_stats=false"))
    rows = [json.loads(l) for l in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["rollout/logprob_gap"] <= 1e-4 for r in rows)  # sampling vs teacher forcing
    assert rows[0]["optim/grad_norm"] > 0 and rows[0]["train/skipped"] == 0.0
    policy, ref = built["pair"].policy, built["pair"].reference
    assert policy.core.model.language_model.layers[0].gradient_checkpointing and policy.training
    for name, p in policy.named_parameters():
        changed = not torch.equal(built["init"][name], p.detach())
        assert changed == (".language_model." in name), name
        assert not any(f in name for f in FROZEN) or not p.requires_grad
    for name, p in ref.named_parameters():  # the frozen reference never moves
        assert torch.equal(p, built["init"][name]), name
    final = JanusForConditionalGeneration.from_pretrained(str(result.run_dir / "final"))
    trained = policy.core.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in final.state_dict().items())


def test_trainer_lora_trains_adapters_and_merges(tmp_path, monkeypatch) -> None:
    from transformers import JanusForConditionalGeneration

    from stagerl.policies.janus_lora import merge_lora
    from stagerl.trainer import train

    built = _spy(monkeypatch)
    result = train(_cfg(str(tmp_path), "model.lora=true", "model.lora_r=4", "run.steps=1"))
    policy = built["pair"].policy
    for name, p in policy.named_parameters():
        changed = not torch.equal(built["init"][name], p.detach())
        assert changed == ("lora_B" in name), name  # B starts at 0, so A moves from step 2 on
    final = result.run_dir / "final"
    assert (final / "adapter_model.safetensors").is_file()
    merge_lora(str(final), str(tmp_path / "merged"))
    JanusForConditionalGeneration.from_pretrained(str(tmp_path / "merged"))


def test_two_process_ddp_run_keeps_ranks_identical(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2 and ranks[0]["digest"] == ranks[1]["digest"]
    assert ranks[0]["digest"] != ranks[0]["init_digest"]  # training did move the weights
    rows = [json.loads(l) for l in
            (tmp_path / "janus-tiny-test" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["rollout/samples"] == 4.0


def _worker(out: str) -> None:
    """One DDP rank: train 2 steps, then write the parameter digest."""
    import stagerl.trainer as trainer_mod

    torch.set_num_threads(1)
    init: dict = {}
    real = trainer_mod.build_policy

    def spy(model_cfg, need_reference):
        pair = real(model_cfg, need_reference)
        init["digest"] = _digest(pair.policy)
        return pair

    trainer_mod.build_policy = spy
    result = trainer_mod.train(_cfg(out))
    rank = int(os.environ["RANK"])
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump({"digest": _digest(result.policy), "init_digest": init["digest"],
                   "world": int(os.environ["WORLD_SIZE"])}, fh)
    # torch + gloo may abort at interpreter exit after all work is done (docs/development.md)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    _worker(sys.argv[1])
