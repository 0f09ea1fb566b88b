"""Run by tests/test_engines.py, alone or under ``accelerate launch``: train the tiny Janus from a
saved folder through the real CLI entry point, then write what this rank holds.

argv: OUT_DIR MODEL_DIR [dotted overrides...]. Writes OUT_DIR/rank<r>.json with the digest of the
full (gathered) parameters, the world size and the engine, and OUT_DIR/params<r>.pt with the
trainable parameters.
"""

import hashlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import test_trainer  # noqa: E402,F401  (registers the test rewards)

from stagerl import distributed  # noqa: E402
from stagerl.config import load_config  # noqa: E402
from stagerl.trainer import train  # noqa: E402

out, model_dir = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "janus_tiny_test.yaml"), [
    f"model.path={model_dir}", "model.tiny_random=false", "reward.names=[test_redness]",
    "sampling.prompts_per_step=2", "sampling.group_size=4", "sampling.logprob_chunk=24",
    "run.steps=3", f"run.out_dir={out}", "run.name=run", "log.image_every=0", "optim.lr=1e-2",
    *sys.argv[3:]])
result = train(cfg)
state = distributed.gathered_state(result.engine, result.model)
digest = hashlib.sha256()
for name, t in sorted(state.items()):
    digest.update(name.encode())
    digest.update(t.float().numpy().tobytes())
rank = int(os.environ.get("RANK", "0"))
trainable = {n for n, p in result.policy.named_parameters() if p.requires_grad}
torch.save({k: v.float() for k, v in state.items() if k in trainable},
           os.path.join(out, f"params{rank}.pt"))
with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
    json.dump({"digest": digest.hexdigest(), "engine": result.engine,
               "world": int(os.environ.get("WORLD_SIZE", "1")), "steps": result.steps}, fh)
distributed.hard_exit(0)
