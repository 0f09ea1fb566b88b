"""Two CPU processes (gloo DDP through torchrun + accelerate): groups stay whole on one rank,
metrics are gathered, and both ranks end with identical parameters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_two_process_training_keeps_ranks_identical(tmp_path, tiny_model_dir):
    script = Path(__file__).with_name("ddp_train_script.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path), str(tiny_model_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    assert ranks[0]["digest"] == ranks[1]["digest"]
    rows = [json.loads(l) for l in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # each rank sampled 2 prompts x 4; the gathered per-rank count is the mean over ranks
    assert rows[0]["rollout/samples"] == 8.0
    assert all(abs(r["loss/total"]) < 1e6 for r in rows)
