"""The ``stagerl`` command line.

The contract: every user mistake, in every subcommand, ends with one line ``stagerl: error: ...``
naming the option, field or file, exit code 2, no traceback, and nothing half-made left behind.
Inputs are checked before any model loads (:mod:`stagerl.preflight`); long phases show a progress
bar with ETA when stderr is a terminal.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

from stagerl.errors import UserError
from stagerl.preflight import float_arg, int_arg

# Subcommands implemented elsewhere expose add_cli_args(parser) and run_cli(args) -> int.
_DELEGATED = {
    "reward-server": ("stagerl.rewards.server", "Serve registered rewards over HTTP."),
    "merge-lora": ("stagerl.policies.janus", "Merge a LoRA checkpoint into a full Janus model."),
}
_SEED = int_arg(0, 2 ** 63 - 1)


class _Parser(argparse.ArgumentParser):
    """argparse under the CLI's contract: a usage mistake is a UserError (one line, exit 2), and
    options cannot be abbreviated (a misspelt option is an error, not a guess)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:  # type: ignore[override]
        command = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        raise UserError(f"{command}{message} (see {self.prog} --help)")


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


def _config_dirs() -> list[Path]:
    """Where preset configs are looked up by name: ./configs, the installed package's configs/,
    and the source checkout's configs/."""
    package = Path(__file__).resolve().parent
    return [Path("configs"), package / "configs", package.parent.parent / "configs"]


def preset_names() -> list[str]:
    names = {p.relative_to(d).with_suffix("").as_posix() for d in _config_dirs() if d.is_dir()
             for p in d.rglob("*.yaml") if "accelerate" not in p.parts}
    return sorted(names)


def find_config(name: str | None) -> str | None:
    """A config path as given, or a preset by name (``shapes_grpo``, ``ablations/stage``)."""
    if name is None or Path(name).is_file():
        return name
    stem = name[:-5] if name.endswith(".yaml") else name
    for d in _config_dirs():
        if (d / f"{stem}.yaml").is_file():
            return str(d / f"{stem}.yaml")
    if Path(name).exists():
        raise UserError(f"config file {name} is not a file")
    raise UserError(f"config file not found: {name} (presets: {', '.join(preset_names())})")


def _split_config_args(items: list[str]) -> tuple[str | None, list[str]]:
    """``[config.yaml | preset] [key=value ...]`` -> (config path, overrides)."""
    path, overrides = None, []
    for it in items:
        if "=" in it:
            overrides.append(it)
        elif path is None:
            path = it
        else:
            raise UserError(f"unexpected argument {it!r}: give one config file, then key=value "
                            f"overrides")
    return find_config(path), overrides


# --------------------------------------------------------------------------------------------------
# train


def cmd_train(args: argparse.Namespace) -> int:
    from stagerl.config import load_config
    from stagerl.trainer import preflight_train
    from stagerl.report import write_plots

    path, overrides = _split_config_args(args.config)
    if args.resume:
        overrides.append("run.resume=true")
    cfg = load_config(path, overrides)
    run_dir = preflight_train(cfg)
    if cfg.run.resume and _main_process():
        print(_resume_line(run_dir, cfg.run.steps), flush=True)
    result = _train_cleanly(cfg, run_dir)
    if not _main_process():
        return 0
    _print_train_result(result, write_plots(result.run_dir))
    return 0


def _resume_line(run_dir: Path, steps: int) -> str:
    from stagerl.checkpoint import checkpoint_step, latest_checkpoint

    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        return f"no complete checkpoint in {run_dir / 'checkpoints'}; starting from step 0"
    step = checkpoint_step(ckpt)
    if step >= steps:
        raise UserError(f"run.steps={steps}: {run_dir} already finished step {step}; give a larger "
                        f"run.steps to train it further")
    return f"resuming from step {step} of {steps} ({ckpt})"


def _train_cleanly(cfg: Any, run_dir: Path) -> Any:
    """Train; if it fails before logging anything, remove the folders this call created."""
    from stagerl.trainer import train

    created = [p for p in [run_dir, *run_dir.parents] if not p.exists()]
    try:
        return train(cfg, progress=_progress(cfg.log.progress))
    except BaseException:
        if _main_process():
            _remove_unused(created)
        raise


def _remove_unused(created: list[Path]) -> None:
    """Remove a run folder made by this call that holds no metrics row and no checkpoint, then
    the empty parent folders this call made."""
    from stagerl.tracking import read_metrics

    if not created:
        return
    run_dir = created[0]
    try:
        used = bool(read_metrics(run_dir)) or any((run_dir / "checkpoints").glob("step_*"))
    except UserError:
        used = True
    if used:
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in created[1:]:
        try:
            parent.rmdir()
        except OSError:
            break


def _print_train_result(result: Any, plots: list[Path]) -> None:
    from stagerl.eval import format_table

    rows = {}
    if result.eval_before:
        rows["base (before)"] = result.eval_before["strict"]
    if result.eval_after:
        rows["trained"] = result.eval_after["strict"]
    if rows:
        suite = (result.eval_after or result.eval_before)
        print(format_table(rows, f"Held-out strict accuracy ({suite['suite']}, {suite['prompts']} "
                                 f"prompts x {suite['images_per_prompt']} images)"))
        if result.eval_before and result.eval_after:
            d = result.eval_after["strict"]["overall"] - result.eval_before["strict"]["overall"]
            print(f"overall change: {d:+.3f}")
    print(f"finished {result.steps} steps in {result.seconds / 60:.1f} min "
          f"({result.skipped} skipped)")
    print(f"run directory: {result.run_dir}")
    print(f"  metrics:     {result.run_dir / 'metrics.jsonl'} (+ tensorboard/)")
    print(f"  image grids: {result.run_dir / 'images'}")
    print(f"  plots:       {', '.join(str(p) for p in plots)}")
    print(f"  final model: {result.run_dir / 'final'}")


# --------------------------------------------------------------------------------------------------
# eval / sample: which model


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


def _eval_config(args: argparse.Namespace) -> tuple[Any, Path | None]:
    """The config of the model to evaluate or sample from (nothing loaded yet), and the weights
    of an intermediate checkpoint to load on top of it."""
    from stagerl.config import load_config
    from stagerl.preflight import check_model_path

    model, saved, weights = _resolve_checkpoint(args.checkpoint)
    config = find_config(args.config) or (str(saved) if saved and saved.is_file() else None)
    if weights is not None and config is None:
        raise UserError(f"--checkpoint {args.checkpoint}: no config.yaml beside the checkpoint")
    extra = [f"model.path={model}"] if model else []
    cfg = load_config(config, list(args.set or []) + extra + ["run.resume=false"])
    check_model_path(cfg.model, "--checkpoint" if model else "model.path")
    return cfg, weights


def _build_eval_policy(cfg: Any, weights: Path | None) -> Any:
    from stagerl.policies import build_policy

    policy = build_policy(cfg.model, need_reference=False).policy
    if weights is not None:
        _load_weights(policy, weights)
    return policy


def _load_weights(policy: Any, path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"{path.parent}: no model.safetensors (a sharded checkpoint is exported "
                        f"only at the end of training, as final/)")
    try:
        policy.load_state_dict(load_file(str(path)))
    except (SafetensorError, RuntimeError, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{path}: cannot load these weights ({first})") from None


def _sampling_params(cfg: Any, cfg_scale: float | None) -> Any:
    from stagerl.policies.base import SamplingParams

    return SamplingParams.from_config(cfg.sampling, cfg_scale)


def _seed(args: argparse.Namespace, cfg: Any) -> int:
    """``--seed``, else the config's ``log.eval_seed``."""
    return cfg.log.eval_seed if args.seed is None else args.seed


# --------------------------------------------------------------------------------------------------
# eval


def cmd_eval(args: argparse.Namespace) -> int:
    if args.benchmark == "list":
        from stagerl.benchmarks import format_benchmark_list

        print(format_benchmark_list())
        return 0
    _check_eval_args(args)
    cfg, weights = _eval_config(args)
    if args.benchmark:
        return _eval_benchmark(args, cfg, weights)
    return _eval_suites(args, cfg, weights)


def _check_eval_args(args: argparse.Namespace) -> None:
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


def _eval_suites(args: argparse.Namespace, cfg: Any, weights: Path | None) -> int:
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
        print(f"suite {suite}: scoring {prompts} prompts x {args.images_per_prompt} images",
              flush=True)
        res = evaluate_suite(policy, suite, prompts, args.images_per_prompt, params,
                             _seed(args, cfg), out_dir=(out / suite) if out else None,
                             progress=_progress())
        print(format_table({"strict": res.strict, "lenient": res.lenient},
                           f"suite {suite}: {res.prompts} prompts x {res.images_per_prompt} "
                           f"images, cfg {params.cfg_scale}"))
        print(f"mean partial credit: {res.partial:.3f}\n")
        results[suite] = res.to_dict()
    _write_json(args.json, results)
    return 0


def _eval_benchmark(args: argparse.Namespace, cfg: Any, weights: Path | None) -> int:
    from stagerl.eval import evaluate_benchmark, format_table, load_benchmark
    from stagerl.preflight import check_sampling_fits
    from stagerl.rewards.base import build_reward, check_reward_kwargs

    bench = args.benchmark
    items = load_benchmark(bench, args.prompts)  # a shipped set's name, a file or a folder
    names = [n.strip() for n in args.rewards.split(",") if n.strip()] if args.rewards \
        else list(cfg.reward.names)
    if not names:
        raise UserError("--rewards: expected at least one reward name")
    kwargs = dict(cfg.reward.kwargs)
    check_reward_kwargs(kwargs)
    for n in names:  # unknown names and arguments fail now, not after sampling
        build_reward(n, **dict(kwargs.get(n) or {}))
    params = _sampling_params(cfg, args.cfg_scale)
    check_sampling_fits(cfg.model, len(items), args.images_per_prompt, "--benchmark x "
                        "--images-per-prompt", params.cfg_scale != 1.0)
    scope = "the whole file" if args.prompts is None else f"at most {args.prompts} per file"
    print(f"{bench}: scoring {len(items)} prompts ({scope}) x {args.images_per_prompt} images = "
          f"{len(items) * args.images_per_prompt} images with {', '.join(names)}", flush=True)
    policy = _build_eval_policy(cfg, weights)
    res = evaluate_benchmark(policy, bench, names, kwargs, args.images_per_prompt, params,
                             _seed(args, cfg), Path(args.out) if args.out else None,
                             max_prompts=args.prompts, items=items, progress=_progress())
    print(format_table(res["scores"], f"{bench}: mean reward by category"))
    for note in res.get("notes", []):
        print(f"note: {note}")
    _write_json(args.json, {Path(bench).stem: res})
    return 0


def _write_json(path: str | None, results: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=1))


# --------------------------------------------------------------------------------------------------
# sample


def cmd_sample(args: argparse.Namespace) -> int:
    from stagerl.eval import generate_images
    from stagerl.preflight import check_output_dir, check_sampling_fits

    items = _sample_items(args)
    check_output_dir(args.out, "--out")
    cfg, weights = _eval_config(args)
    params = _sampling_params(cfg, args.cfg_scale)
    check_sampling_fits(cfg.model, len(items), args.n, "prompts x --n", params.cfg_scale != 1.0)
    policy = _build_eval_policy(cfg, weights)
    generate_images(policy, items, args.n, params, _seed(args, cfg), Path(args.out),
                    progress=_progress())
    print(f"wrote {len(items) * args.n} images for {len(items)} prompts under {args.out}")
    return 0


def _sample_items(args: argparse.Namespace) -> list[Any]:
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
# report, pretrain, study, config


def cmd_report(args: argparse.Namespace) -> int:
    from stagerl.report import write_plots

    if not Path(args.run_dir).is_dir():
        raise UserError(f"run directory not found: {args.run_dir}")
    for p in write_plots(args.run_dir):
        print(p)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from stagerl.preflight import check_output_dir
    from stagerl.pretrain import format_table as pretrain_table
    from stagerl.pretrain import run_from_args

    check_output_dir(args.out, "--out")
    _check_pretrain_numbers(args)
    result = run_from_args(args)
    print(f"saved to {args.out}  ({result['total_seconds']:.0f}s, {result['threads']} threads, "
          f"final loss {result['final_loss']:.3f})")
    for ev in result["evals"]:
        print(f"\nsuite {ev['suite']}, {ev['prompts']} prompts x "
              f"{ev['images_per_prompt']} images, CFG {ev['cfg_scale']}:")
        print(pretrain_table(ev))
    return 0


def _check_pretrain_numbers(args: argparse.Namespace) -> None:
    """Every number of the pretraining recipe is finite and >= 0; probabilities and the EMA decay
    are at most 1."""
    import dataclasses
    import math

    from stagerl.pretrain import PretrainConfig

    for f in dataclasses.fields(PretrainConfig):
        values = getattr(args, f.name)
        for v in values if isinstance(values, list) else [values]:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            top = 1.0 if f.name in ("prompt_dropout", "ema_decay") else math.inf
            if not (math.isfinite(v) and 0 <= v <= top):
                flag = "--" + f.name.replace("_", "-")
                span = "in [0, 1]" if top == 1.0 else "finite and >= 0"
                raise UserError(f"pretrain: {flag} must be {span}, got {values}")


def _study_progress() -> Callable[[str], None]:
    """The study reports "[k/N] run" and "[k/N] run done"; on a terminal that becomes a bar over
    the N runs with an ETA, elsewhere one printed line per message."""
    factory = _progress()
    if factory is None:
        return lambda msg: print(msg, flush=True)
    bars: list[Any] = []

    def report(msg: str) -> None:
        m = re.match(r"\[(\d+)/(\d+)\] (.*?)( done)?$", msg)
        if m is None:
            (bars[0].write if bars else print)(msg)
            return
        if not bars:
            bars.append(factory(total=int(m.group(2)), desc="study runs", unit="run"))
        if m.group(4):
            bars[0].update(1)
        else:
            bars[0].set_postfix_str(m.group(3))

    return report


def cmd_study(args: argparse.Namespace) -> int:
    from stagerl.study import run_from_args

    summary, paths = run_from_args(args, progress=_study_progress())
    print(f"study finished in {summary['wall_seconds'] / 60:.1f} min "
          f"({summary['reused_runs']} of {len(summary['runs'])} runs reused)")
    for p in paths:
        print(f"  {p}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from stagerl.config import field_help, load_config, to_yaml

    if args.fields:
        if args.config:
            raise UserError(f"config --fields lists every field and takes no config or "
                            f"overrides (got {' '.join(args.config)})")
        for key, default, help_ in field_help():
            print(f"{key} = {default}\n    {help_}")
        return 0
    path, overrides = _split_config_args(args.config)
    print(to_yaml(load_config(path, overrides)), end="")
    return 0


# --------------------------------------------------------------------------------------------------
# The parser


def _add_model_args(e: argparse.ArgumentParser) -> None:
    e.add_argument("--checkpoint", default="builtin:shapes",
                   help="model folder, run folder (its final/ model, else its newest checkpoint), "
                        "a run's checkpoints/step_N, hub id, or builtin:shapes (default: "
                        "%(default)s)")
    e.add_argument("--config", default=None,
                   help="config YAML or preset name (model kind, sampling, rewards) (default: the "
                        "config saved with a run's checkpoint, else the built-in defaults)")
    e.add_argument("--set", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. sampling.temperature=0.9 (default: none)")
    e.add_argument("--cfg-scale", type=float_arg(0.0), default=None,
                   help="classifier-free guidance scale >= 0 (default: the config's "
                        "sampling.cfg_scale)")
    e.add_argument("--seed", type=_SEED, default=None,
                   help="seed of the prompts drawn and of sampling (default: the config's "
                        "log.eval_seed)")


def _add_eval_args(e: argparse.ArgumentParser) -> None:
    e.add_argument("--suite", default=None,
                   help="comma list of shapes suites: heldout (= test), compositions, phrasings "
                        "(default: heldout)")
    e.add_argument("--benchmark", default=None,
                   help="instead of --suite: a shipped prompt set by name (geneval, "
                        "t2i-compbench[:category], ocr; 'list' lists them) or a prompt file or "
                        "folder: GenEval .jsonl, T2I-CompBench .txt (category from the file name) "
                        "or a folder of them, DrawBench .csv, OCR .txt (default: none)")
    e.add_argument("--rewards", default=None,
                   help="--benchmark only: comma list of reward names (default: the config's "
                        "reward.names)")
    e.add_argument("--prompts", type=int_arg(1), default=None,
                   help="prompts per suite, or the first N prompts of each benchmark file "
                        "(default: 200 per suite; a benchmark's whole file)")
    e.add_argument("--images-per-prompt", type=int_arg(1), default=4,
                   help="images sampled per prompt (default: %(default)s)")
    e.add_argument("--out", default=None,
                   help="write GenEval's folder layout here; rerunning reuses its images "
                        "(default: nothing written)")
    e.add_argument("--json", default=None, help="write results JSON here (default: none)")


def _add_sample_args(e: argparse.ArgumentParser) -> None:
    e.add_argument("prompts", nargs="*", help="prompts to draw (or use --file)")
    e.add_argument("--file", default=None,
                   help="prompt file instead: .txt (one a line), GenEval .jsonl or .csv "
                        "(default: none)")
    e.add_argument("--n", type=int_arg(1), default=4, help="images per prompt (default: "
                                                            "%(default)s)")
    e.add_argument("--out", default="samples", help="output folder, GenEval's layout (default: "
                                                    "%(default)s)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="stagerl", description="STAGE: stable GRPO for autoregressive text-to-image "
                "models (arXiv 2509.25027).")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser("train", help="Train with STAGE/GRPO (default: STAGE on the shapes world).")
    t.add_argument("config", nargs="*", help="[config.yaml or preset name, e.g. shapes_grpo] "
                                             "[dotted.key=value ...]")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in run.out_dir/run.name from its latest checkpoint")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="Evaluate a checkpoint on shapes suites or a prompt file.")
    _add_model_args(e)
    _add_eval_args(e)
    e.set_defaults(fn=cmd_eval)
    s = sub.add_parser("sample", help="Generate images for prompts.")
    _add_model_args(s)
    _add_sample_args(s)
    s.set_defaults(fn=cmd_sample)

    r = sub.add_parser("report", help="Write PNG plots of a run's metrics.")
    r.add_argument("run_dir")
    r.set_defaults(fn=cmd_report)

    c = sub.add_parser("config", help="Print the resolved config, or every documented field.")
    c.add_argument("config", nargs="*", help="[config.yaml or preset name] [dotted.key=value ...]")
    c.add_argument("--fields", action="store_true", help="list every field with its help")
    c.set_defaults(fn=cmd_config)

    for name, module, fn, help_ in (
            ("pretrain", "stagerl.pretrain", cmd_pretrain,
             "Pretrain the shapes-world tokenizer and model."),
            ("study", "stagerl.study", cmd_study,
             "Run the STAGE-vs-GRPO reproduction study on the shapes world.")):
        d = sub.add_parser(name, help=help_)
        d.set_defaults(fn=fn)
        importlib.import_module(module).add_cli_args(d)

    for name, (module, help_) in _DELEGATED.items():
        d = sub.add_parser(name, help=help_)
        d.set_defaults(fn=_delegate(module), _module=module)
        _add_delegated_args(d, module)
    return p


def _add_delegated_args(parser: argparse.ArgumentParser, module: str) -> None:
    try:
        importlib.import_module(module).add_cli_args(parser)
    except (ImportError, AttributeError):  # not available in this install; run_cli says why
        parser.add_argument("rest", nargs=argparse.REMAINDER)


def _delegate(module: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            mod = importlib.import_module(module)
        except ImportError as err:
            raise UserError(f"{args.command} is not available: {err}") from None
        if not hasattr(mod, "run_cli"):
            raise UserError(f"{args.command} is not available in this version")
        return int(mod.run_cli(args) or 0)

    return run


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse; ``train`` and ``config`` also take their config and overrides after an option
    (``stagerl train --resume run.name=x``), which argparse alone would reject."""
    args, extra = parser.parse_known_args(argv)
    command = getattr(args, "command", None)
    if extra and command in ("train", "config") and not any(x.startswith("-") for x in extra):
        args.config = list(args.config) + extra
    elif extra:
        raise UserError(f"{command}: unrecognized arguments: {' '.join(extra)} (see stagerl "
                        f"{command} --help)")
    return args


def _quiet_deepspeed_on_cpu() -> None:
    """DeepSpeed, once installed, is imported by accelerate and warns on every CPU run that it
    "could not detect" a GPU; naming its CPU accelerator up front says the same thing quietly."""
    if "DS_ACCELERATOR" not in os.environ and importlib.util.find_spec("deepspeed") is not None:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def main(argv: list[str] | None = None) -> int:
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    _quiet_deepspeed_on_cpu()
    try:
        args = _parse(build_parser(), argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        code = args.fn(args)
    except UserError as err:
        print(f"stagerl: error: {' '.join(str(err).split())}", file=sys.stderr)
        code = err.exit_code
    except KeyboardInterrupt:
        print("stagerl: interrupted", file=sys.stderr)
        code = 130
    if distributed:
        # torch + gloo can abort at interpreter exit after all work is done (docs/development.md,
        # "Exit abort"); every output is flushed and closed by now, so skip the exit handlers.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
