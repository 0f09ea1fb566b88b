"""Run by tests/test_engines.py under ``accelerate launch``: count the parameter all-gathers of one
rollout of the tiny Janus, with and without ``distributed.sampling_weights``.

argv: OUT_DIR MODEL_DIR. Writes OUT_DIR/gathers<rank>.json = {"per_rollout": n (a whole rollout
inside sampling_weights), "per_token": n (ZeRO-3 only: sampling alone with the engine's own
per-module gathering), "tokens": L, "layers": ..., "engine": ...}.
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import test_trainer  # noqa: E402,F401  (registers the test rewards)

from stagerl import distributed  # noqa: E402
from stagerl.config import load_config, needs_reference  # noqa: E402
from stagerl.data import build_source  # noqa: E402
from stagerl.policies import build_policy  # noqa: E402
from stagerl.policies.base import SamplingParams  # noqa: E402
from stagerl.rewards.base import RewardSet  # noqa: E402
from stagerl.rollout import rollout  # noqa: E402

out, model_dir = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
torch.set_num_threads(1)
cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "janus_tiny_test.yaml"), [
    f"model.path={model_dir}", "model.tiny_random=false", "reward.names=[test_redness]",
    "sampling.prompts_per_step=2", "sampling.group_size=4", f"run.out_dir={out}"])
engine = distributed.check_launch(cfg)
pair = build_policy(cfg.model, need_reference=needs_reference(cfg))
accelerator = distributed.make_accelerator(cfg, engine, 4)
model, _, _ = distributed.prepare(accelerator, engine, pair.policy,
                                  lambda ps: torch.optim.AdamW(ps, lr=1e-3))
policy = distributed.unwrap(accelerator, model)
items = build_source(cfg.data.source, 0, True).batch(accelerator.process_index, 1)
rewards = RewardSet(["test_redness"], {})

calls = {"n": 0}


def _count(module, name):
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    setattr(module, name, counted)


# Where each engine's parameter all-gathers go through (looked up at call time).
if engine == "deepspeed":
    import deepspeed.comm as ds_comm

    for fn in ("all_gather_into_tensor", "all_gather", "allgather_fn"):
        if hasattr(ds_comm, fn):
            _count(ds_comm, fn)
else:
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    _count(_fsdp_param_group, "foreach_all_gather")


def whole_rollout() -> int:
    """Sampling, teacher-forced log-probs, code vectors and decoding, weights gathered once."""
    calls["n"] = 0
    with distributed.sampling_weights(engine, model):
        rollout(policy, pair.reference, items, 0, rewards, cfg, seed=0, train_forward=model)
    return calls["n"]


def bare_sampling() -> int:
    """Sampling alone with the engine's own per-module gathering (what the trainer used to do)."""
    calls["n"] = 0
    params = SamplingParams(cfg_scale=cfg.sampling.cfg_scale)
    policy.sample(policy.encode_prompts([items[0].prompt] * 4).to(accelerator.device), params,
                  noise=torch.rand(4, policy.num_image_tokens))
    return calls["n"]


result = {"per_rollout": whole_rollout(), "engine": engine,
          "tokens": policy.num_image_tokens, "layers": len(policy.shard_units()),
          "param_tensors": len(list(policy.parameters()))}
if engine == "deepspeed":  # FSDP2 cannot sample outside sampling_weights at all (no root forward)
    result["per_token"] = bare_sampling()
with open(os.path.join(out, f"gathers{accelerator.process_index}.json"), "w") as fh:
    json.dump(result, fh)
accelerator.wait_for_everyone()
distributed.hard_exit(0)
