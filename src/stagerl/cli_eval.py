"""``stagerl eval`` and ``stagerl sample``: loading a model to evaluate or sample, and their
options; plus what every subcommand shares: finding preset configs by name and the progress bars
(a tqdm factory that is off without a terminal).

Kept apart from :mod:`stagerl.cli` (the parser and the other subcommands) by concern.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from stagerl.errors import UserError
from stagerl.preflight import float_arg, int_arg

_SEED = int_arg(0, 2 ** 63 - 1)

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


