"""The ``stagerl`` command line. User errors print one line and exit 2; no tracebacks."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

from stagerl.errors import UserError

# Subcommands implemented elsewhere expose add_cli_args(parser) and run_cli(args) -> int.
_DELEGATED = {
    "reward-server": ("stagerl.rewards.server", "Serve registered rewards over HTTP."),
    "merge-lora": ("stagerl.policies.janus", "Merge a LoRA checkpoint into a full Janus model."),
}


def _split_config_args(items: list[str]) -> tuple[str | None, list[str]]:
    """``[config.yaml] [key=value ...]`` -> (config path, overrides)."""
    path, overrides = None, []
    for it in items:
        if "=" in it:
            overrides.append(it)
        elif path is None:
            path = it
        else:
            raise UserError(f"unexpected argument {it!r}: give one config file, then key=value "
                            f"overrides")
    return path, overrides


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from stagerl.config import load_config
    from stagerl.report import write_plots
    from stagerl.trainer import train

    path, overrides = _split_config_args(args.config)
    if args.resume:
        overrides.append("run.resume=true")
    cfg = load_config(path, overrides)
    result = train(cfg, progress=tqdm if cfg.log.progress else None)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    plots = write_plots(result.run_dir)
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
    return 0


def _load_policy_for_eval(checkpoint: str, config: str | None, overrides: list[str]) -> Any:
    from stagerl.config import load_config
    from stagerl.policies import build_policy

    ckpt = Path(checkpoint)
    if ckpt.is_dir() and (ckpt / "final").is_dir():  # a run directory
        if config is None and (ckpt / "config.yaml").is_file():
            config = str(ckpt / "config.yaml")
        ckpt = ckpt / "final"
    cfg = load_config(config, overrides + [f"model.path={ckpt}", "run.resume=false"])
    return build_policy(cfg.model, need_reference=False).policy, cfg


def cmd_eval(args: argparse.Namespace) -> int:
    from stagerl.eval import evaluate_shapes, format_table
    from stagerl.policies.base import SamplingParams

    if args.benchmark == "list":
        from stagerl.benchmarks import format_benchmark_list

        print(format_benchmark_list())
        return 0
    policy, cfg = _load_policy_for_eval(args.checkpoint, args.config, args.set or [])
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else cfg.sampling.cfg_scale
    out = Path(args.out) if args.out else None
    results: dict[str, Any] = {}
    if args.benchmark:
        from stagerl.eval import evaluate_benchmark

        names = args.rewards.split(",") if args.rewards else list(cfg.reward.names)
        params = SamplingParams(cfg_scale, cfg.sampling.temperature, cfg.sampling.top_k,
                                cfg.sampling.top_p)
        res = evaluate_benchmark(policy, args.benchmark, names, dict(cfg.reward.kwargs),
                                 args.images_per_prompt, params, args.seed, out,
                                 max_prompts=args.prompts)
        print(format_table(res["scores"], f"{args.benchmark}: mean reward by category"))
        results[Path(args.benchmark).stem] = res
    else:
        for suite in args.suite.split(","):
            res = evaluate_shapes(policy, suite, args.prompts, args.images_per_prompt, cfg_scale,
                                  args.seed, out_dir=(out / suite) if out else None)
            print(format_table({"strict": res["strict"], "lenient": res["lenient"]},
                               f"suite {suite}: {res['prompts']} prompts x "
                               f"{res['images_per_prompt']} images, cfg {cfg_scale}"))
            print(f"mean partial credit: {res['partial']:.3f}\n")
            results[suite] = res
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from stagerl.data import PromptItem, load_prompt_file
    from stagerl.eval import generate_images
    from stagerl.policies.base import SamplingParams

    policy, cfg = _load_policy_for_eval(args.checkpoint, args.config, args.set or [])
    items = load_prompt_file(args.file) if args.file else [PromptItem(p, {"prompt": p})
                                                          for p in args.prompts]
    if not items:
        raise UserError("sample: give prompts as arguments or --file PATH")
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else cfg.sampling.cfg_scale
    params = SamplingParams(cfg_scale, cfg.sampling.temperature, cfg.sampling.top_k,
                            cfg.sampling.top_p)
    generate_images(policy, items, args.n, params, args.seed, Path(args.out))
    print(f"wrote {len(items) * args.n} images for {len(items)} prompts under {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from stagerl.report import write_plots

    if not Path(args.run_dir).is_dir():
        raise UserError(f"run directory not found: {args.run_dir}")
    for p in write_plots(args.run_dir):
        print(p)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from stagerl.worlds.shapes.pretrain import format_table as pretrain_table
    from stagerl.worlds.shapes.pretrain import run_from_args

    result = run_from_args(args)
    print(f"saved to {args.out}  ({result['total_seconds']:.0f}s, {result['threads']} threads, "
          f"final loss {result['final_loss']:.3f})")
    for ev in result["evals"]:
        print(f"\nheld-out '{ev['split']}' split, {ev['prompts']} prompts x "
              f"{ev['images_per_prompt']} images, CFG {ev['cfg_scale']}:")
        print(pretrain_table(ev))
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from stagerl.study import run_from_args

    summary, paths = run_from_args(args, progress=lambda msg: print(msg, flush=True))
    print(f"study finished in {summary['wall_seconds'] / 60:.1f} min "
          f"({summary['reused_runs']} of {len(summary['runs'])} runs reused)")
    for p in paths:
        print(f"  {p}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from stagerl.config import field_help, load_config, to_yaml

    if args.fields:
        for key, default, help_ in field_help():
            print(f"{key} = {default}\n    {help_}")
        return 0
    path, overrides = _split_config_args(args.config)
    print(to_yaml(load_config(path, overrides)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stagerl", description="STAGE: stable GRPO for autoregressive "
                                "text-to-image models (arXiv 2509.25027).")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser("train", help="Train with STAGE/GRPO (default: STAGE on the shapes world).")
    t.add_argument("config", nargs="*", help="[config.yaml] [dotted.key=value ...]")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    t.set_defaults(fn=cmd_train)

    for name, help_ in (("eval", "Evaluate a checkpoint on shapes suites or a prompt file."),
                        ("sample", "Generate images for prompts.")):
        e = sub.add_parser(name, help=help_)
        e.add_argument("--checkpoint", default="builtin:shapes",
                       help="model dir, run dir, hub id, or builtin:shapes (default)")
        e.add_argument("--config", default=None, help="config YAML (model kind, sampling, rewards)")
        e.add_argument("--set", nargs="*", help="dotted config overrides")
        e.add_argument("--cfg-scale", type=float, default=None)
        e.add_argument("--seed", type=int, default=1234)
        if name == "eval":
            e.add_argument("--suite", default="heldout",
                           help="comma list of shapes suites: heldout (=test), compositions, "
                                "phrasings")
            e.add_argument("--benchmark", default=None,
                           help="a shipped prompt set by name (geneval, t2i-compbench[:category], "
                                "ocr; 'list' lists them) or a prompt file or folder: GenEval "
                                ".jsonl, T2I-CompBench .txt (category from the file name) or a "
                                "folder of them, DrawBench .csv, OCR .txt")
            e.add_argument("--rewards", default=None, help="comma list of reward names")
            e.add_argument("--prompts", type=int, default=200)
            e.add_argument("--images-per-prompt", type=int, default=4)
            e.add_argument("--out", default=None, help="write GenEval folder layout here")
            e.add_argument("--json", default=None, help="write results JSON here")
            e.set_defaults(fn=cmd_eval)
        else:
            e.add_argument("prompts", nargs="*")
            e.add_argument("--file", default=None)
            e.add_argument("--n", type=int, default=4, help="images per prompt")
            e.add_argument("--out", default="samples")
            e.set_defaults(fn=cmd_sample)

    r = sub.add_parser("report", help="Write PNG plots of a run's metrics.")
    r.add_argument("run_dir")
    r.set_defaults(fn=cmd_report)

    c = sub.add_parser("config", help="Print the resolved config, or every documented field.")
    c.add_argument("config", nargs="*", help="[config.yaml] [dotted.key=value ...]")
    c.add_argument("--fields", action="store_true", help="list every field with its help")
    c.set_defaults(fn=cmd_config)

    for name, module, fn, help_ in (
            ("pretrain", "stagerl.worlds.shapes.pretrain", cmd_pretrain,
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        code = args.fn(args)
    except UserError as err:
        print(f"stagerl: error: {err}", file=sys.stderr)
        code = err.exit_code
    except KeyboardInterrupt:
        print("stagerl: interrupted", file=sys.stderr)
        code = 130
    if distributed:
        # torch + gloo can abort at interpreter exit after all work is done (platform.md); every
        # output is flushed and closed by now, so leave without running the exit handlers.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
