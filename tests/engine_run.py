"""Run by tests/test_engines.py (and tests/test_llamagen_engines.py), alone or under
``accelerate launch``: train a tiny model from a saved folder through the real training entry
point, then write what this rank holds.

argv: OUT_DIR MODEL_DIR [dotted overrides...]. Writes OUT_DIR/rank<r>.json with the digest of the
full (gathered) parameters, the world size, the engine and the steps, and OUT_DIR/params<r>.pt with
the trainable parameters.
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


def run_and_report(config: str, out: str, model_dir: str, overrides: list[str]) -> None:
    """Train ``configs/<config>`` for 3 steps (2 prompts x 4 samples) on ``model_dir``, write this
    rank's report into ``out``, and exit the process (distributed.hard_exit)."""
    torch.set_num_threads(1)
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", config), [
        f"model.path={model_dir}", "model.tiny_random=false", "reward.names=[test_redness]",
        "sampling.prompts_per_step=2", "sampling.group_size=4", "sampling.logprob_chunk=24",
        "run.steps=3", f"run.out_dir={out}", "run.name=run", "log.image_every=0",
        "optim.lr=1e-2", *overrides])
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


if __name__ == "__main__":
    run_and_report("janus_tiny_test.yaml", sys.argv[1], sys.argv[2], sys.argv[3:])
