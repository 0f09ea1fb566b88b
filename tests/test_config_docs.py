"""Every config field is documented, and docs/config.md is current."""

import importlib.util
import re
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


def _table_rows(text: str) -> list[list[str]]:
    """Every table row of a markdown page as its cells, split the way GitHub-flavoured markdown
    splits them (on ``|`` not escaped as ``\\|``), with the escapes undone."""
    return [[c.replace("\\|", "|").strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            for line in text.splitlines() if line.startswith("| ")]


def test_config_reference_cells_keep_their_pipes():
    # A '|' in a help text or default must not end its cell (nor be rewritten, as '</User/>' for
    # '<|User|>' once was: a copied value then trained on the wrong prompts).
    from stagerl.policies.janus import JANUS_PRO_TEMPLATE

    rows = _table_rows((ROOT / "docs" / "config.md").read_text())
    assert rows and all(len(cells) == 3 for cells in rows), [c for c in rows if len(c) != 3]
    docs = {cells[0].strip("`"): cells for cells in rows}
    shown = JANUS_PRO_TEMPLATE.encode("unicode_escape").decode()  # newlines as \n, as in the help
    assert f"'{shown}'" in docs["model.prompt_template"][2]
    assert "</User/>" not in (ROOT / "docs" / "config.md").read_text()
    defaults = {k: d for k, d, _ in field_help()}
    for key, cells in docs.items():
        if key in defaults:
            assert cells[1] == f"`{defaults[key]}`", key


def test_benchmarks_page_and_eval_help_agree_on_the_prompts_default():
    # The code scores a benchmark whole unless --prompts is given (cli_eval.run_eval ->
    # load_benchmark(bench, None)); the help and docs/benchmarks.md must both say so.
    from stagerl.cli_eval import EvalOptions
    from stagerl.cli_options import options_help

    help_ = {k: (d, h) for k, d, h in options_help(EvalOptions)}["prompts"]
    assert help_[0] == "None" and "a benchmark's whole file" in help_[1]
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    bullet = next(b for b in page.split("\n- ") if "`--prompts N`" in b)
    assert "whole by default" in bullet and "default 200)" not in bullet, bullet
