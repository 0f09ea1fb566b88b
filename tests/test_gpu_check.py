"""The prepared GPU check (scripts/gpu_check.py) cannot rot: its CPU dry run exercises every phase."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "g.json")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0
    assert proc.stdout.strip().count("\n") == 0 and "no CUDA device" in proc.stdout
    assert not (tmp_path / "g.json").exists()


@pytest.mark.slow
def test_dry_run_exercises_every_phase(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] is True
    engine = report["engines"]["ddp"]
    assert engine["ok"] and len(engine["loss"]) == 3
    assert all(gap <= 1e-4 for gap in engine["logprob_gap"])  # sampling vs teacher forcing, fp32
    sampler = report["sampler"]
    assert sampler["same_tokens"] is True  # our sampler draws what generate() draws
    assert sampler["ours_tokens_per_s"] > 0 and sampler["generate_tokens_per_s"] > 0
    assert report["memory"]["weights_gib"] >= 0
