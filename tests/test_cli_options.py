"""Every command's options go through the training config's loader (src/stagerl/cli_options.py):
a YAML file, then ``--flags``, then ``key=value`` overrides, with the same checks and the same
error text whichever way a value came in."""

from __future__ import annotations

import argparse

import pytest

from stagerl.cli_eval import EvalOptions, SampleOptions, _sample_options
from stagerl.cli_options import add_option_flags, options_from_args, split_positional
from stagerl.config import load_options
from stagerl.errors import UserError
from stagerl.pretrain import PretrainConfig, PretrainOptions


def _parse(cls, argv):
    p = argparse.ArgumentParser()
    add_option_flags(p, cls)
    args = p.parse_intermixed_args(argv)  # as the CLI's parser: files and overrides anywhere
    return options_from_args(cls, args, args.options)


def test_file_then_flags_then_overrides(tmp_path):
    f = tmp_path / "o.yaml"
    f.write_text("prompts: 8\nimages_per_prompt: 3\nsuite: compositions\n")
    opts = _parse(EvalOptions, [str(f), "--images-per-prompt", "2", "suite=phrasings",
                                "set=[sampling.temperature=0.9]"])
    assert isinstance(opts, EvalOptions)
    assert (opts.prompts, opts.images_per_prompt, opts.suite) == (8, 2, "phrasings")
    assert opts.set == ["sampling.temperature=0.9"]
    assert _parse(EvalOptions, ["--prompts", "5", "prompts=6"]).prompts == 6  # override wins
    assert _parse(EvalOptions, []).images_per_prompt == 4  # the dataclass default


@pytest.mark.parametrize("value", ["0", "-3"])
def test_one_check_three_spellings(tmp_path, value):
    """The same bad value names the flag, the key, or the file and line it came from."""
    f = tmp_path / "o.yaml"
    f.write_text(f"suite: heldout\nimages_per_prompt: {value}\n")
    msgs = []
    for argv in (["--images-per-prompt", value], [f"images_per_prompt={value}"], [str(f)]):
        with pytest.raises(UserError) as err:
            _parse(EvalOptions, argv)
        msgs.append(str(err.value))
    problem = f"expected a value >= 1, got {value}"
    assert msgs == [f"--images-per-prompt: {problem}", f"images_per_prompt: {problem}",
                    f"{f}:2: images_per_prompt: {problem}"]


def test_types_bounds_and_unknown_keys():
    with pytest.raises(UserError, match=r"^--seed: expected a whole number, got 'abc'$"):
        _parse(EvalOptions, ["--seed", "abc"])
    with pytest.raises(UserError, match=r"--cfg-scale: expected a finite number"):
        _parse(EvalOptions, ["--cfg-scale", "nan"])
    with pytest.raises(UserError, match=r"unknown option 'promts'.*Did you mean 'prompts'"):
        _parse(EvalOptions, ["promts=3"])
    with pytest.raises(UserError, match=r"unknown config key 'promts'.*Did you mean 'prompts'"):
        load_options(EvalOptions, overrides=["promts=3"])  # the loader itself, past the CLI
    # a bound on a list bounds each element
    with pytest.raises(UserError, match=r"--eval-cfg-scales: expected a value >= 0.0, got -1.0"):
        _parse(PretrainOptions, ["--eval-cfg-scales", "2", "-1"])
    with pytest.raises(UserError, match=r"--prompt-dropout: expected a value <= 1.0"):
        _parse(PretrainOptions, ["--prompt-dropout", "2"])


def test_positional_items():
    path, overrides, rest = split_positional(["n=2", "a red circle", "x=y"], SampleOptions,
                                             other=lambda item: True)
    assert (path, overrides, rest) == (None, ["n=2"], ["a red circle", "x=y"])
    with pytest.raises(UserError, match="unexpected argument 'loose'"):
        split_positional(["loose"], EvalOptions)
    with pytest.raises(UserError, match="options file not found: no.yaml"):
        split_positional(["no.yaml"], EvalOptions)


def test_sample_prompts_flags_and_overrides(tmp_path):
    p = argparse.ArgumentParser()
    p.add_argument("options", nargs="*")
    add_option_flags(p, SampleOptions, positional=None)
    opts = _sample_options(p.parse_args(["a red circle", "n=2", "--out", str(tmp_path)]))
    assert (opts.prompts, opts.n, opts.out) == (["a red circle"], 2, str(tmp_path))
    with pytest.raises(UserError, match=r"^--n: expected a value >= 1, got 0$"):
        _sample_options(p.parse_args(["a red circle", "--n", "0"]))


def test_pretrain_options_are_the_recipe_plus_out():
    opts = _parse(PretrainOptions, ["--steps", "7", "out=somewhere"])
    recipe = opts.recipe()
    assert type(recipe) is PretrainConfig and recipe.steps == 7 and not hasattr(recipe, "out")
    assert opts.out == "somewhere"


def test_study_options_lists_and_raw_overrides(tmp_path):
    from stagerl.study.cli import StudyOptions, command_line

    f = tmp_path / "study.yaml"
    f.write_text("seeds: 2\nconditions: [lenient]\n")
    opts = _parse(StudyOptions, [str(f), "--lr-sweep", "2,4", "--rows", "stage", "vanilla_grpo",
                                 "--set", "reward.names=[shapes_strict,shapes_partial]"])
    assert opts.seeds == 2 and opts.conditions == ["lenient"] and opts.lr_sweep == [2.0, 4.0]
    assert opts.rows == ["stage", "vanilla_grpo"]
    assert opts.set == ["reward.names=[shapes_strict,shapes_partial]"]  # not split at its comma
    line = command_line(opts)
    assert "--seeds 2" in line and "--lr-sweep 2 4" in line and "--conditions lenient" in line
    assert _parse(StudyOptions, line.split()[2:]) == opts  # the header's command reproduces them
