"""Every shipped accelerate launch file parses, and each single-machine one has a CPU smoke variant
in configs/accelerate/cpu/ that differs from it only in the process count and the precision, so the
CPU smoke recipe (configs/janus_tiny_test.yaml) runs under every engine a GPU user runs
(docs/janus.md, "CPU smoke runs"). Running them is tests/test_engines.py's job."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stagerl.config import load_config

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "configs" / "accelerate"
SHIPPED = sorted(LAUNCH.glob("*.yaml"))
# Launch files without a CPU variant, and why: two machines cannot be faked on one CPU box; its
# engine (ZeRO-3) is covered by cpu/deepspeed_zero3.yaml.
NO_CPU_VARIANT = {"multinode_example.yaml"}
# What a CPU variant changes: 2 processes (gloo), no mixed precision (the smoke recipe's), no
# GPU ids.
CPU_CHANGES = {"num_processes": 2, "mixed_precision": "no"}


def _load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), path
    return data


def test_the_shipped_set_is_the_expected_one():
    names = {p.name for p in SHIPPED}
    assert {"ddp.yaml", "fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero2_offload.yaml",
            "deepspeed_zero3.yaml", "deepspeed_zero3_offload.yaml"} <= names
    assert NO_CPU_VARIANT <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_launch_file_parses(path):
    d = _load(path)
    assert d["distributed_type"] in ("MULTI_GPU", "FSDP", "DEEPSPEED"), path.name
    # `mixed_precision: no` unquoted would be YAML's False, not accelerate's "no"
    assert d["mixed_precision"] in ("no", "bf16", "fp16"), d["mixed_precision"]
    assert isinstance(d["num_processes"], int) and d["num_processes"] >= 1
    if d["distributed_type"] == "DEEPSPEED":
        ds = d["deepspeed_config"]
        assert ds["zero_stage"] in (2, 3)
        assert ds["gradient_accumulation_steps"] == "auto" and ds["gradient_clipping"] == "auto"
        assert ds["offload_optimizer_device"] in ("none", "cpu")
        assert ds["offload_param_device"] in ("none", "cpu")
        if ds["offload_param_device"] != "none":
            assert ds["zero_stage"] == 3  # DeepSpeed offloads parameters only under ZeRO-3
        # the file's name says what it offloads
        assert ("offload" in path.stem) == (ds["offload_optimizer_device"] != "none"), path.name


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.name not in NO_CPU_VARIANT],
                         ids=lambda p: p.name)
def test_cpu_variant_exists_and_differs_only_in_processes_and_precision(path):
    cpu = LAUNCH / "cpu" / path.name
    assert cpu.is_file(), f"{path.name} has no CPU smoke variant {cpu.relative_to(ROOT)}"
    shipped, variant = _load(path), _load(cpu)
    assert {k: variant.get(k) for k in CPU_CHANGES} == CPU_CHANGES
    expected = {k: v for k, v in shipped.items() if k != "gpu_ids"}
    expected.update(CPU_CHANGES)
    assert variant == expected
    # the command in its header names itself and the smoke recipe
    assert f"configs/accelerate/cpu/{path.name}" in cpu.read_text()


def test_no_stray_cpu_variant():
    names = {p.name for p in SHIPPED}
    stray = [p.name for p in (LAUNCH / "cpu").glob("*.yaml") if p.name not in names]
    assert not stray, stray


def test_cpu_smoke_recipe_matches_the_cpu_variants():
    """The smoke recipe's precision and prompt count fit every CPU variant (the launch checks in
    stagerl.distributed refuse a mismatch; this keeps the shipped pair from drifting into one)."""
    cfg = load_config(str(ROOT / "configs" / "janus_tiny_test.yaml"))
    for path in (LAUNCH / "cpu").glob("*.yaml"):
        d = _load(path)
        assert d["mixed_precision"] == cfg.run.mixed_precision, path.name
        assert cfg.sampling.prompts_per_step % d["num_processes"] == 0, path.name


# ---- the first-run compile notice (stagerl.ds_ops) -------------------------------------------

def _plugin_config(monkeypatch, launch: str) -> dict:
    """DeepSpeed's config as accelerate builds it from a launch file's environment."""
    pytest.importorskip("deepspeed", reason="the 'deepspeed' extra is installed by `make test`")
    from accelerate.utils import DeepSpeedPlugin

    ds = _load(LAUNCH / "cpu" / f"{launch}.yaml")["deepspeed_config"]
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", str(ds["zero_stage"]))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
                       ds["offload_optimizer_device"])
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", ds["offload_param_device"])
    return DeepSpeedPlugin().deepspeed_config


@pytest.mark.parametrize("launch, ops", [
    ("deepspeed_zero2", ["deepspeed_shm_comm"]),
    ("deepspeed_zero3", ["deepspeed_shm_comm"]),
    ("deepspeed_zero2_offload", ["deepspeed_shm_comm", "cpu_adam"]),
    ("deepspeed_zero3_offload", ["deepspeed_shm_comm", "cpu_adam"]),
])
def test_the_ops_a_launch_file_needs(launch, ops, monkeypatch):
    from stagerl import ds_ops

    cfg = _plugin_config(monkeypatch, launch)
    assert ds_ops.needed_ops(cfg, has_gpu=False) == ops
    assert ds_ops.needed_ops(cfg, has_gpu=True) == [o for o in ops if o != "deepspeed_shm_comm"]


def test_first_offload_run_says_it_compiles_once(monkeypatch, tmp_path, caplog):
    """Nothing built: one warning per op naming it, its DS_BUILD_* switch and the cache; once the
    op is in the JIT cache, or prebuilt into the package, nothing is said."""
    pytest.importorskip("deepspeed", reason="the 'deepspeed' extra is installed by `make test`")
    import deepspeed.git_version_info as info
    import torch

    from stagerl import ds_ops

    from deepspeed.accelerator import get_accelerator

    if get_accelerator()._name != "cpu":
        pytest.skip("the shared-memory op is DeepSpeed's CPU accelerator's")
    cfg = _plugin_config(monkeypatch, "deepspeed_zero2_offload")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(info, "installed_ops", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level("WARNING", logger="stagerl.ds_ops"):
        pending = ds_ops.announce_builds(cfg)
    ours = [r for r in caplog.records if r.name == "stagerl.ds_ops"]
    assert pending == ["deepspeed_shm_comm", "cpu_adam"] and len(ours) == 2
    msg = ours[1].getMessage()
    assert "cpu_adam" in msg and "DS_BUILD_CPU_ADAM=1" in msg and str(tmp_path) in msg
    import deepspeed

    assert f"deepspeed=={deepspeed.__version__} " in msg  # a reinstall keeps the version

    (tmp_path / "cpu_adam").mkdir()
    (tmp_path / "cpu_adam" / "cpu_adam.so").write_bytes(b"")
    assert ds_ops.pending_builds(["deepspeed_shm_comm", "cpu_adam"]) == ["deepspeed_shm_comm"]
    monkeypatch.setattr(info, "accelerator_name", get_accelerator()._name)
    monkeypatch.setattr(info, "installed_ops", {"deepspeed_shm_comm": True})
    assert ds_ops.pending_builds(["deepspeed_shm_comm", "cpu_adam"]) == []
    caplog.clear()
    monkeypatch.setenv("RANK", "1")  # the other ranks stay quiet
    (tmp_path / "cpu_adam" / "cpu_adam.so").unlink()
    assert ds_ops.announce_builds(cfg) == ["cpu_adam"]
    assert not [r for r in caplog.records if r.name == "stagerl.ds_ops"]
