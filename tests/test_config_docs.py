"""Every config field is documented, and docs/config.md is current."""

import importlib.util
from pathlib import Path

from stagerl.config import field_help

ROOT = Path(__file__).resolve().parents[1]


def test_every_field_has_help():
    missing = [k for k, _, h in field_help() if len(h) < 10]
    assert not missing, f"undocumented config fields: {missing}"


def test_config_reference_is_current():
    spec = importlib.util.spec_from_file_location("gen", ROOT / "scripts" / "gen_config_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (ROOT / "docs" / "config.md").read_text() == gen.render(), \
        "docs/config.md is stale: run python scripts/gen_config_docs.py"


def test_every_command_option_has_help():
    spec = importlib.util.spec_from_file_location("gen", ROOT / "scripts" / "gen_config_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    from stagerl.cli_options import options_help

    missing = [f"{command}.{k}" for command, cls in gen.COMMANDS
               for k, _, h in options_help(cls) if len(h) < 10]
    assert not missing, f"undocumented options: {missing}"
    assert {command for command, _ in gen.COMMANDS} >= {"pretrain", "eval", "sample", "study"}
