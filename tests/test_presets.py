"""Preset configs ship inside the package (src/stagerl/configs, package data), so an installed
stagerl finds them by name from any folder; the repository's configs/ is a link to them."""

from __future__ import annotations

import tomllib
from pathlib import Path

import stagerl
from stagerl.cli import find_config, preset_names
from stagerl.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(stagerl.__file__).resolve().parent


def test_presets_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = Path(find_config("shapes_grpo"))
    assert path.resolve().is_relative_to(PACKAGE / "configs")
    assert load_config(str(path)).algo.preset == "vanilla_grpo"
    assert {"shapes_grpo", "shapes_stage", "ablations/stage", "janus_pro_7b_geneval"} <= \
        set(preset_names())


def test_every_preset_is_package_data():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["stagerl"]
    shipped = {p for g in globs for p in PACKAGE.glob(g) if p.is_file()}
    presets = {p for p in (PACKAGE / "configs").rglob("*.yaml")}
    assert presets and presets <= shipped
    assert (ROOT / "configs").resolve() == (PACKAGE / "configs").resolve()
