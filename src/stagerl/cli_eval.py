"""``stagerl eval`` and ``stagerl sample``: loading a model to evaluate or sample, and their
options; plus what every subcommand shares: finding preset configs by name and the progress bars
(a tqdm factory that is off without a terminal).

Kept apart from :mod:`stagerl.cli` (the parser and the other subcommands) by concern; cli.py
owns stdout, and the commands here report each line through the ``say`` it passes in.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

Say = Callable[[str], None]  # one line for the user (cli.py prints it, flushed)

from stagerl.cli_options import add_option_flags, options_from_args
from stagerl.config_schema import _f
from stagerl.errors import UserError
from stagerl.policies.base import Policy
from stagerl.config_schema import Config


# --------------------------------------------------------------------------------------------------
# The options (docs/config.md, "Other commands")


@dataclass
class ModelChoice:
    """Which model to evaluate or sample from, and how to sample it."""

    checkpoint: str = _f("builtin:shapes", "Model folder, run folder (its final/ model, else its "
                         "newest checkpoint), a run's checkpoints/step_N, hub id, or "
                         "builtin:shapes.")
    config: Optional[str] = _f(None, "Config YAML or preset name (model kind, sampling, rewards); "
                               "default: the config saved with a run's checkpoint, else the "
                               "built-in defaults.")
    set: list[str] = _f([], "Dotted overrides of that config, e.g. sampling.temperature=0.9.",
                        metavar="KEY=VALUE", empty_ok=True, raw=True)
    cfg_scale: Optional[float] = _f(None, "Classifier-free guidance scale >= 0; default: the "
                                    "config's sampling.cfg_scale.", min=0.0)
    seed: Optional[int] = _f(None, "Seed of the prompts drawn and of sampling; default: the "
                             "config's log.eval_seed.", min=0, max=2 ** 63 - 1)


@dataclass
class EvalOptions(ModelChoice):
    """``stagerl eval``: a shapes suite scored by the exact evaluator, or a benchmark scored by
    rewards."""

    suite: Optional[str] = _f(None, "Comma list of shapes suites: heldout (= test), compositions, "
                              "phrasings; default: heldout.")
    benchmark: Optional[str] = _f(None, "Instead of suite: a shipped prompt set by name (geneval, "
                                  "t2i-compbench[:category], ocr; 'list' lists them) or a prompt "
                                  "file or folder: GenEval .jsonl, T2I-CompBench .txt (category "
                                  "from the file name) or a folder of them, DrawBench .csv, OCR "
                                  ".txt.")
    rewards: Optional[str] = _f(None, "Benchmark only: comma list of reward names; default: the "
                                "config's reward.names.")
    prompts: Optional[int] = _f(None, "Prompts per suite, or the first N prompts of each "
                                "benchmark file; default: 200 per suite, a benchmark's whole "
                                "file.", min=1)
    images_per_prompt: int = _f(4, "Images sampled per prompt.", min=1)
    out: Optional[str] = _f(None, "Write GenEval's folder layout here; rerunning reuses its "
                            "images.")
    json: Optional[str] = _f(None, "Write results JSON here.")


@dataclass
class SampleOptions(ModelChoice):
    """``stagerl sample``: images for prompts, in GenEval's folder layout."""

    prompts: list[str] = _f([], "Prompts to draw (also the command's bare arguments).", cli=False)
    file: Optional[str] = _f(None, "Prompt file instead: .txt (one a line), GenEval .jsonl or "
                             ".csv.")
    n: int = _f(4, "Images per prompt.", min=1)
    out: str = _f("samples", "Output folder, GenEval's layout.")


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _progress(enabled: bool = True) -> Callable[..., Any] | None:
    """A tqdm factory (bars with ETA), or None when disabled or when stderr is not a terminal."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return functools.partial(tqdm, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------------
# Config files: a path, or a preset name



def config_dirs() -> list[Path]:
    """Where preset configs are looked up by name: ./configs, the installed package's configs/,
    and the source checkout's configs/."""
    package = Path(__file__).resolve().parent
    return [Path("configs"), package / "configs", package.parent.parent / "configs"]


def preset_names() -> list[str]:
    names = {p.relative_to(d).with_suffix("").as_posix() for d in config_dirs() if d.is_dir()
             for p in d.rglob("*.yaml") if "accelerate" not in p.parts}
    return sorted(names)


def find_config(name: str | None) -> str | None:
    """A config path as given, or a preset by name (``shapes_grpo``, ``ablations/stage``)."""
    if name is None or Path(name).is_file():
        return name
    stem = name[:-5] if name.endswith(".yaml") else name
    for d in config_dirs():
        if (d / f"{stem}.yaml").is_file():
            return str(d / f"{stem}.yaml")
    if Path(name).exists():
        raise UserError(f"config file {name} is not a file")
    raise UserError(f"config file not found: {name} (presets: {', '.join(preset_names())})")


def _resolve_checkpoint(checkpoint: str) -> tuple[str, Path | None, Path | None]:
    """--checkpoint -> (model path, the config saved with it, weights to load on top).

    A run folder means its final/ model (or, without one, its newest complete checkpoint); a
    ``checkpoints/step_N`` folder means the run's base model with that step's weights."""
    from stagerl.checkpoint import MARKER, latest_checkpoint

    ckpt = Path(checkpoint)
    if not ckpt.is_dir():
        return checkpoint, None, None
    if (ckpt / MARKER).is_file():  # an intermediate checkpoint
        return "", ckpt / "config.yaml", ckpt / "model.safetensors"
    if (ckpt / "final").is_dir() or (ckpt / "checkpoints").is_dir():
        saved = ckpt / "config.yaml" if (ckpt / "config.yaml").is_file() else None
        if (ckpt / "final").is_dir():
            return str(ckpt / "final"), saved, None
        step = latest_checkpoint(ckpt / "checkpoints")
        if step is None:
            raise UserError(f"--checkpoint {checkpoint}: a run folder with neither final/ nor a "
                            f"complete checkpoint")
        return "", step / "config.yaml", step / "model.safetensors"
    return checkpoint, None, None


def _eval_config(args: ModelChoice) -> tuple[Any, Path | None]:
    """The config of the model to evaluate or sample from (nothing loaded yet), and the weights
    of an intermediate checkpoint to load on top of it."""
    from stagerl.config import load_config
    from stagerl.preflight import check_model_path

    model, saved, weights = _resolve_checkpoint(args.checkpoint)
    config = find_config(args.config) or (str(saved) if saved and saved.is_file() else None)
    if weights is not None and config is None:
        raise UserError(f"--checkpoint {args.checkpoint}: no config.yaml beside the checkpoint")
    pinned = _checkpoint_model(args.checkpoint, model, saved if weights is not None else None,
                               config)
    extra = [f"model.path={model}"] if model else []
    cfg = load_config(config, pinned + list(args.set or []) + extra + ["run.resume=false"])
    if model and cfg.model.kind == "tiny" and re.fullmatch(r"[\w.-]+/[\w.-]+", model) \
            and not Path(model).exists():  # a hub id: the shapes model is never on the hub
        raise UserError(f"--checkpoint {model}: no such folder, and a hub id needs a hub model "
                        f"kind: add --set model.kind=janus (or --config janus_pro_1b_geneval)")
    check_model_path(cfg.model, "--checkpoint" if model else "model.path")
    return cfg, weights


def _checkpoint_model(checkpoint: str, model: str, step_config: Path | None,
                      config: str | None) -> list[str]:
    """Overrides that make the config build exactly the model that was saved.

    A model folder (a run's final/, a ``merge-lora`` output, an adapter folder, a shapes model)
    names its kind by its own files, whatever the config's default kind; a saved folder is loaded
    as it is, never rebuilt at random (``model.tiny_random`` only says how a run *started*). A
    step checkpoint's weights fit the architecture its own config.yaml builds, so that config's
    model section is kept even under another --config."""
    import stagerl.policies  # noqa: F401  (registers every kind's folder recogniser)
    from stagerl.policies.registry import folder_kind, policy_kinds

    if model and Path(model).expanduser().is_dir():
        kind = folder_kind(model)
        if kind is None:
            raise UserError(f"--checkpoint {checkpoint}: {model} is not a saved model folder of "
                            f"any kind ({', '.join(policy_kinds())}); e.g. a Janus checkpoint "
                            f"has config.json with model_type janus, a LoRA adapter "
                            f"adapter_config.json, a shapes model config.json + vocab.json")
        return [f"model.kind={kind}", "model.tiny_random=false"]
    if step_config is not None and config != str(step_config):
        from stagerl.config import load_config

        saved = load_config(str(step_config), ["run.resume=false"]).model
        return [f"model.{k}={json.dumps(v)}" for k, v in dataclasses.asdict(saved).items()]
    return []


def _build_eval_policy(cfg: Config, weights: Path | None) -> Any:
    from stagerl.policies import build_policy

    policy = build_policy(cfg.model, need_reference=False).policy
    if weights is not None:
        _load_weights(policy, weights)
    return policy


def _load_weights(policy: Policy, path: Path) -> None:
    """Load a ``checkpoints/step_N`` folder's weights (``path``: the folder or a file in it) into
    ``policy``, whatever engine saved them (stagerl.checkpoint.consolidated_state_dict). A LoRA
    checkpoint holds the adapters only: the base weights are the ones ``policy`` was built with."""
    from stagerl.checkpoint import consolidated_state_dict, read_run_info

    folder = path if path.is_dir() else path.parent
    try:
        state = consolidated_state_dict(folder)
    except (RuntimeError, OSError, ValueError) as err:  # safetensors' errors are ValueErrors
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{folder}: cannot read these weights ({first})") from None
    adapters_only = bool((read_run_info(folder) or {}).get("lora"))
    try:
        missing, unexpected = policy.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{folder}: cannot load these weights ({first})") from None
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    # A tied weight (Janus' lm_head shares embed_tokens' storage) is saved once, under one name:
    # the other name is "missing" from the file but was loaded through its twin.
    own = policy.state_dict(keep_vars=True)
    loaded = {own[k].data_ptr() for k in state if k in own}
    lost = [k for k in missing if (not adapters_only or k in trainable)
            and own[k].data_ptr() not in loaded]
    if unexpected or lost:
        what = (f"{len(unexpected)} weights the model does not have (e.g. {unexpected[0]})"
                if unexpected else f"no {lost[0]} (and {len(lost) - 1} more missing)")
        raise UserError(f"{folder}: these weights do not fit the model its config.yaml "
                        f"builds: {what}")


def _sampling_params(cfg: Config, cfg_scale: float | None) -> Any:
    from stagerl.policies.base import SamplingParams

    return SamplingParams.from_config(cfg.sampling, cfg_scale)


def _seed(args: ModelChoice, cfg: Config) -> int:
    """``--seed``, else the config's ``log.eval_seed``."""
    return cfg.log.eval_seed if args.seed is None else args.seed


# --------------------------------------------------------------------------------------------------
# eval


def run_eval(cli_args: argparse.Namespace, say: Say) -> int:
    """``stagerl eval``; every line for the user goes through ``say`` (cli.py owns stdout)."""
    args = options_from_args(EvalOptions, cli_args, cli_args.options)
    if args.benchmark == "list":
        from stagerl.benchmarks import format_benchmark_list

        say(format_benchmark_list())
        return 0
    _check_eval_args(args)
    cfg, weights = _eval_config(args)
    if args.benchmark:
        return _eval_benchmark(args, cfg, weights, say)
    return _eval_suites(args, cfg, weights, say)


def _check_eval_args(args: EvalOptions) -> None:
    from stagerl.eval import check_suite
    from stagerl.preflight import check_output_dir, check_output_file

    if args.benchmark and args.suite is not None:
        raise UserError("eval: give --suite or --benchmark, not both (--suite would be ignored)")
    if args.rewards is not None and not args.benchmark:
        raise UserError("eval: --rewards applies to --benchmark only; shapes suites are scored "
                        "by the exact shapes evaluator")
    for suite in ([] if args.benchmark else (args.suite or "heldout").split(",")):
        check_suite(suite.strip())
    if args.out:
        check_output_dir(args.out, "--out")
    if args.json:
        check_output_file(args.json, "--json")


def _eval_suites(args: EvalOptions, cfg: Config, weights: Path | None, say: Say) -> int:
    from stagerl.eval import evaluate_suite, format_table
    from stagerl.preflight import check_sampling_fits

    suites = [s.strip() for s in (args.suite or "heldout").split(",")]
    prompts = args.prompts or 200
    params = _sampling_params(cfg, args.cfg_scale)
    check_sampling_fits(cfg.model, prompts, args.images_per_prompt, "--prompts x "
                        "--images-per-prompt", params.cfg_scale != 1.0)
    policy = _build_eval_policy(cfg, weights)
    out = Path(args.out) if args.out else None
    results: dict[str, Any] = {}
    for suite in suites:
        say(f"suite {suite}: scoring {prompts} prompts x {args.images_per_prompt} images")
        res = evaluate_suite(policy, suite, prompts, args.images_per_prompt, params,
                             _seed(args, cfg), out_dir=(out / suite) if out else None,
                             progress=_progress())
        say(format_table({"strict": res.strict, "lenient": res.lenient},
                         f"suite {suite}: {res.prompts} prompts x {res.images_per_prompt} "
                         f"images, cfg {params.cfg_scale}"))
        say(f"mean partial credit: {res.partial:.3f}\n")
        results[suite] = res.to_dict()
    _write_json(args.json, results)
    return 0


def _eval_benchmark(args: EvalOptions, cfg: Config, weights: Path | None, say: Say) -> int:
    from stagerl.benchmarks import check_benchmark_rewards
    from stagerl.eval import evaluate_benchmark, format_table, load_benchmark
    from stagerl.preflight import check_sampling_fits
    from stagerl.rewards.base import build_reward, check_reward_kwargs

    bench = args.benchmark
    items = load_benchmark(bench, args.prompts)  # a shipped set's name, a file or a folder
    names = [n.strip() for n in args.rewards.split(",") if n.strip()] if args.rewards \
        else list(cfg.reward.names)
    if not names:
        raise UserError("--rewards: expected at least one reward name")
    check_benchmark_rewards(bench, names, "--rewards" if args.rewards else
                            "the config's reward.names")
    kwargs = dict(cfg.reward.kwargs)
    check_reward_kwargs(kwargs)
    for n in names:  # unknown names and arguments fail now, not after sampling
        build_reward(n, **dict(kwargs.get(n) or {}))
    params = _sampling_params(cfg, args.cfg_scale)
    check_sampling_fits(cfg.model, len(items), args.images_per_prompt, "--benchmark x "
                        "--images-per-prompt", params.cfg_scale != 1.0)
    _warn_unreadable(bench, items, cfg, say)
    scope = "the whole file" if args.prompts is None else f"at most {args.prompts} per file"
    say(f"{bench}: scoring {len(items)} prompts ({scope}) x {args.images_per_prompt} images = "
        f"{len(items) * args.images_per_prompt} images with {', '.join(names)}")
    policy = _build_eval_policy(cfg, weights)
    res = evaluate_benchmark(policy, bench, names, kwargs, args.images_per_prompt, params,
                             _seed(args, cfg), Path(args.out) if args.out else None,
                             max_prompts=args.prompts, items=items, progress=_progress())
    say(format_table(res["scores"], f"{bench}: mean reward by category"))
    for note in res.get("notes", []):
        say(f"note: {note}")
    _write_json(args.json, {Path(bench).stem: res})
    return 0


def _write_json(path: str | None, results: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=1))


# --------------------------------------------------------------------------------------------------
# sample


def run_sample(cli_args: argparse.Namespace, say: Say) -> int:
    """``stagerl sample``; the summary line goes through ``say``."""
    from stagerl.eval import generate_images
    from stagerl.preflight import check_output_dir, check_sampling_fits

    args = _sample_options(cli_args)
    items = _sample_items(args)
    check_output_dir(args.out, "--out")
    cfg, weights = _eval_config(args)
    _check_sample_prompts(args, cfg)
    params = _sampling_params(cfg, args.cfg_scale)
    check_sampling_fits(cfg.model, len(items), args.n, "prompts x --n", params.cfg_scale != 1.0)
    policy = _build_eval_policy(cfg, weights)
    generate_images(policy, items, args.n, params, _seed(args, cfg), Path(args.out),
                    progress=_progress())
    say(f"wrote {len(items) * args.n} images for {len(items)} prompts under {args.out}")
    return 0


def _check_sample_prompts(args: SampleOptions, cfg: Config) -> None:
    """A prompt the shapes model cannot read (no word it knows) is refused like an empty one:
    it would only draw an unconditional picture."""
    from stagerl.policies.tiny import located_prompts, prompt_vocab

    vocab = prompt_vocab(cfg.model)
    if vocab is not None:
        vocab.check_readable(located_prompts(args.file) if args.file else
                             [(f"sample: prompt {k}", p) for k, p in
                              enumerate(args.prompts, start=1)])


def _warn_unreadable(bench: str, items: list[Any], cfg: Config, say: Say) -> None:
    """One warning for a benchmark's prompts the shapes model cannot read: they are drawn
    unconditionally and scored like the rest (refusing would drop a shipped benchmark's rows)."""
    from stagerl.policies.tiny import prompt_vocab

    vocab = prompt_vocab(cfg.model)
    if vocab is None:
        return
    unread = [it.prompt for it in items if not vocab.readable(it.prompt)]
    if unread:
        say(f"warning: {len(unread)} of {len(items)} {bench} prompts have no word the shapes "
            f"model reads (e.g. {unread[0]!r}) and are drawn unconditionally; it knows: "
            f"{vocab.known_words()}")


def _sample_options(cli_args: argparse.Namespace) -> SampleOptions:
    """The bare arguments are prompts, except an options file and ``key=value`` overrides of a
    field (``n=2``); flags and overrides as for every command."""
    return options_from_args(SampleOptions, cli_args, cli_args.options, rest_to="prompts")


def _sample_items(args: SampleOptions) -> list[Any]:
    from stagerl.data import PromptItem, load_prompt_file

    if args.file and args.prompts:
        raise UserError("sample: give prompts as arguments or --file PATH, not both")
    if args.file:
        items = load_prompt_file(args.file)
        if not items:
            raise UserError(f"--file={args.file}: holds no prompts")
        return items
    if not args.prompts:
        raise UserError("sample: give prompts as arguments or --file PATH")
    for k, p in enumerate(args.prompts, start=1):
        if not p.strip():
            raise UserError(f"sample: prompt {k} is empty")
    return [PromptItem(p, {"prompt": p}) for p in args.prompts]


# --------------------------------------------------------------------------------------------------
# The parsers' flags, generated from the options


def _add_eval_args(e: argparse.ArgumentParser) -> None:
    add_option_flags(e, EvalOptions)


def _add_sample_args(e: argparse.ArgumentParser) -> None:
    e.add_argument("options", nargs="*", metavar="PROMPT",
                   help="prompts to draw (or --file); also an options .yaml file and key=value "
                        "overrides of the flags below, e.g. n=2")
    add_option_flags(e, SampleOptions, positional=None)
