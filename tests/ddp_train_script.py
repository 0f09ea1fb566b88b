"""Run by tests/test_distributed.py under torchrun: train, then write this rank's parameter digest."""

import hashlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import test_trainer  # noqa: E402,F401  (registers the test rewards)

from stagerl.config import load_config  # noqa: E402
from stagerl.trainer import train  # noqa: E402

out, model_dir = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
cfg = load_config(None, [f"model.path={model_dir}", "reward.names=[test_redness]",
                         "sampling.prompts_per_step=4", "sampling.group_size=4", "run.steps=2",
                         f"run.out_dir={out}", "run.name=ddp", "log.eval_prompts=0",
                         "log.tensorboard=false", "log.progress=false", "optim.lr=1e-2",
                         "log.image_every=0", *sys.argv[3:]])
result = train(cfg)
digest = hashlib.sha256()
for name, p in sorted(result.policy.state_dict().items()):
    digest.update(name.encode())
    digest.update(p.detach().cpu().numpy().tobytes())
rank = int(os.environ["RANK"])
with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
    json.dump({"digest": digest.hexdigest(), "world": int(os.environ["WORLD_SIZE"])}, fh)
# torch + gloo may abort at interpreter exit after all work is done (docs/development.md)
sys.stdout.flush()
os._exit(0)
