"""The ``stagerl`` command line.

The contract: every user mistake, in every subcommand, ends with one line ``stagerl: error: ...``
naming the option, field or file, exit code 2, no traceback, and nothing half-made left behind.
Inputs are checked before any model loads (:mod:`stagerl.preflight`); long phases show a progress
bar with ETA when stderr is a terminal.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from stagerl.cli_eval import (_add_eval_args, _add_sample_args, _main_process,  # noqa: F401
                              _progress, find_config, preset_names, run_eval,
                              run_sample)
from stagerl.cli_options import add_option_flags
from stagerl.distributed import hard_exit
from stagerl import quiet
from stagerl.errors import UserError
from stagerl.pretrain import PretrainOptions
from stagerl.proxies.build import ProxyOptions
from stagerl.proxies.proxy import PROXY_KINDS
from stagerl.config_schema import Config

# Subcommands implemented elsewhere expose add_cli_args(parser) and run_cli(args) -> int.
_DELEGATED = {
    "reward-server": ("stagerl.rewards.server_cli", "Serve registered rewards over HTTP."),
    "merge-lora": ("stagerl.policies.janus", "Merge a LoRA checkpoint into a full Janus model."),
}


class _Parser(argparse.ArgumentParser):
    """argparse under the CLI's contract: a usage mistake is a UserError (one line, exit 2), and
    options cannot be abbreviated (a misspelt option is an error, not a guess)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:  # type: ignore[override]
        command = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        raise UserError(f"{command}{message} (see {self.prog} --help)")


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
    cfg = load_config(path, overrides, train=True)
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


def _train_cleanly(cfg: Config, run_dir: Path) -> Any:
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

    before, after = result.eval_before, result.eval_after
    rows = {}
    if before:
        rows["base (before)"] = before.strict
    if after:
        rows["trained"] = after.strict
    if rows:
        ev = after or before
        print(format_table(rows, f"Held-out strict accuracy ({ev.suite}, {ev.prompts} "
                                 f"prompts x {ev.images_per_prompt} images)"))
        if before and after:
            print(f"overall change: {after.strict['overall'] - before.strict['overall']:+.3f}")
    print(f"finished {result.steps} steps in {result.seconds / 60:.1f} min "
          f"({result.skipped} skipped)")
    print(f"run directory: {result.run_dir}")
    # name only the folders this run has (log.tensorboard, log.image_every can turn them off)
    tb = " (+ tensorboard/)" if (result.run_dir / "tensorboard").is_dir() else ""
    print(f"  metrics:     {result.run_dir / 'metrics.jsonl'}{tb}")
    if (result.run_dir / "images").is_dir():
        print(f"  image grids: {result.run_dir / 'images'}")
    print(f"  plots:       {', '.join(str(p) for p in plots)}")
    print(f"  final model: {result.run_dir / 'final'}")


# --------------------------------------------------------------------------------------------------
# eval / sample: which model


def _say(line: str) -> None:
    print(line, flush=True)


def cmd_eval(args: argparse.Namespace) -> int:
    return run_eval(args, _say)


def cmd_sample(args: argparse.Namespace) -> int:
    return run_sample(args, _say)


def cmd_report(args: argparse.Namespace) -> int:
    from stagerl.report import write_plots

    if not Path(args.run_dir).is_dir():
        raise UserError(f"run directory not found: {args.run_dir}")
    for p in write_plots(args.run_dir):
        print(p)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    import shlex

    from stagerl.cli_options import options_from_args
    from stagerl.preflight import check_output_dir
    from stagerl.pretrain import PretrainOptions, model_card, pretrain
    from stagerl.pretrain import format_table as pretrain_table

    opts = options_from_args(PretrainOptions, args, args.options)
    check_output_dir(opts.out, "--out")
    result = pretrain(opts.recipe(), opts.out)
    command = shlex.join(["stagerl", *sys.argv[1:]])  # as typed, for the model card
    (Path(opts.out) / "MODEL_CARD.md").write_text(model_card(result, command))
    print(f"saved to {opts.out}  ({result.total_seconds:.0f}s, {result.threads} threads, "
          f"final loss {result.final_loss:.3f})")
    for ev in result.evals:
        print(f"\nsuite {ev.suite}, {ev.prompts} prompts x {ev.images_per_prompt} images, "
              f"CFG {ev.cfg_scale}:")
        print(pretrain_table(ev))
    return 0


def cmd_pretrain_reward(args: argparse.Namespace) -> int:
    import shlex

    from stagerl.cli_options import options_from_args
    from stagerl.preflight import check_output_dir
    from stagerl.proxies.proxy import save_proxy
    from stagerl.proxies.build import ProxyOptions, build_proxy, proxy_card

    opts = options_from_args(ProxyOptions, args, args.options)
    out = opts.out or f"runs/proxy-{args.name}"
    check_output_dir(out, "--out")
    proxy = build_proxy(args.name, opts.recipe())
    save_proxy(proxy, out)
    command = shlex.join(["stagerl", *sys.argv[1:]])  # as typed, for the card
    (Path(out) / "CARD.md").write_text(proxy_card(proxy, command))
    print(f"saved to {out}  ({proxy.meta['seconds']['total']:.0f}s, "
          f"{proxy.meta['parameters']:,} parameters)")
    for where, a in proxy.meta["agreement"].items():
        print(f"  {where}: strict agreement with gold {a['strict_agreement']:.3f}, false pass "
              f"{a['false_pass']:.3f}, false fail {a['false_fail']:.3f} (n={int(a['n'])})")
    return 0


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
    from stagerl.study.cli import run_from_args

    summary, paths = run_from_args(args, progress=_study_progress())
    print(f"study finished in {summary.wall_seconds / 60:.1f} min "
          f"({summary.reused_runs} of {len(summary.runs)} runs reused)")
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
    _add_eval_args(e)
    e.set_defaults(fn=cmd_eval)
    s = sub.add_parser("sample", help="Generate images for prompts.")
    _add_sample_args(s)
    s.set_defaults(fn=cmd_sample)

    r = sub.add_parser("report", help="Write PNG plots of a run's metrics.")
    r.add_argument("run_dir")
    r.set_defaults(fn=cmd_report)

    c = sub.add_parser("config", help="Print the resolved config, or every documented field.")
    c.add_argument("config", nargs="*", help="[config.yaml or preset name] [dotted.key=value ...]")
    c.add_argument("--fields", action="store_true", help="list every field with its help")
    c.set_defaults(fn=cmd_config)

    pt = sub.add_parser("pretrain", help="Pretrain the shapes-world tokenizer and model.")
    pt.set_defaults(fn=cmd_pretrain)
    add_option_flags(pt, PretrainOptions)
    pr = sub.add_parser("pretrain-reward", help="Build a learned proxy reward of the shapes "
                        "world (shapes_detector, shapes_scorer), labelled by the exact evaluator.")
    pr.add_argument("name", choices=tuple(PROXY_KINDS), help="which proxy to build")
    pr.set_defaults(fn=cmd_pretrain_reward)
    add_option_flags(pr, ProxyOptions)
    st = sub.add_parser("study", help="Run the STAGE-vs-GRPO reproduction study on the shapes "
                                      "world.")
    st.set_defaults(fn=cmd_study)
    importlib.import_module("stagerl.study.cli").add_cli_args(st)

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
    """Parse; every command also takes its config or options file and overrides after an option
    (``stagerl train --resume run.name=x``), which argparse alone would reject."""
    args, extra = parser.parse_known_args(argv)
    command = getattr(args, "command", None)
    dest = "config" if command in ("train", "config") else "options"
    if extra and hasattr(args, dest) and not any(x.startswith("-") for x in extra):
        setattr(args, dest, list(getattr(args, dest)) + extra)
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


LATE_RANK_GRACE_S = 10.0  # how long a rank other than 0 waits before exiting on a user error


def _report(line: str, distributed: bool) -> None:
    """Print a final ``stagerl: ...`` line on stderr: once per launch, by rank 0, when several
    processes run (each meets the same preflight error, before any collective). Every rank also
    leaves the line in its launcher's error file (TORCHELASTIC_ERROR_FILE, set by torchrun and
    accelerate launch), so the launcher's failure summary shows it instead of a link to its docs,
    including for an error only one rank met (docs/janus.md, "When a launch fails")."""
    if not distributed or _main_process():
        print(line, file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE") if distributed else None
    if error_file:
        # torch.distributed.elastic's error-file layout: {"message": {"message": ..., "extraInfo":
        # {"py_callstack": ..., "timestamp": ...}}}; its summary prints py_callstack.
        info = {"py_callstack": line, "timestamp": str(int(time.time()))}
        try:
            Path(error_file).write_text(json.dumps({"message": {"message": line,
                                                                "extraInfo": info}}))
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    _quiet_deepspeed_on_cpu()
    try:
        args = _parse(build_parser(), argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        quiet.install(verbose=args.verbose)  # known-harmless library warnings (stagerl/quiet.py)
        code = args.fn(args)
    except UserError as err:
        _report(f"stagerl: error: {' '.join(str(err).split())}", distributed)
        code = err.exit_code
        if distributed and not _main_process():
            # Rank 0 meets the same error and prints it; a rank that got there first waits, or
            # the launcher would stop rank 0 (SIGTERM) before it printed anything. An error only
            # this rank met still ends the launch, LATE_RANK_GRACE_S later.
            time.sleep(LATE_RANK_GRACE_S)
    except KeyboardInterrupt:
        _report("stagerl: interrupted", distributed)
        code = 130
    except Exception as err:
        if distributed and os.environ.get("TORCHELASTIC_ERROR_FILE"):
            # a crash, not a user error: each rank prints its own traceback, and the launcher's
            # summary shows the first failing rank's (torch's own error-file writer)
            from torch.distributed.elastic.multiprocessing.errors import get_error_handler

            get_error_handler().record_exception(err)
        raise
    if distributed:
        # torch + gloo can abort at interpreter exit after all work is done (docs/development.md,
        # "Exit abort"), and every rank ends with the same code: skip the exit handlers.
        hard_exit(code)
    return code
