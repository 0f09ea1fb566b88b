"""STAGE GRPO training loop: rollout -> update, on accelerate. Reads top to bottom.

One step = one rollout of P prompts x G samples (split across processes by whole groups), then
``algo.updates_per_rollout`` optimisation passes over it. See docs/algorithm.md sections cited inline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stagerl import algo, distributed, preflight
from stagerl import checkpoint, ds_ops
from stagerl.checkpoint import (TrainerState, latest_checkpoint, load_checkpoint, resolve_run_dir,
                                save_checkpoint)
from stagerl.config import Config, needs_reference, to_yaml
from stagerl.data import build_source, mix_seed
from stagerl.errors import UserError
from stagerl.eval import ShapesEval, evaluate_suite
from stagerl.policies import build_policy
from stagerl.policies.base import Policy, SamplingParams
from stagerl.rewards.base import RewardSet
from stagerl.rollout import Rollout, rollout
from stagerl.tracking import Tracker, check_tracker, image_grid

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)


class TrainingStopped(UserError):
    """Raised when too many consecutive steps had to be skipped."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    skipped: int
    eval_before: ShapesEval | None  # held-out evaluation before training (without its images
    eval_after: ShapesEval | None  # when read back from a resumed run's folder)
    seconds: float
    policy: Policy | None = None  # the trained (unwrapped) policy, for programmatic use
    model: Any = None  # the engine's module (DDP/DeepSpeed wrapper, FSDP2-sharded policy)
    engine: str = "single"  # see stagerl.distributed


def preflight_train(cfg: Config) -> Path:
    """Everything :func:`train` would otherwise find wrong only after loading the model: the run
    folder, prompts, rewards, model path and memory. Returns the run folder (not created yet)."""
    run_dir = resolve_run_dir(cfg.run, cfg.algo.preset)
    checkpoint.check_resume(cfg, run_dir)  # a checkpoint to resume, loadable by this launch
    preflight.check_data_source(cfg.data.source, cfg.run.seed, cfg.data.shuffle)
    rewards = RewardSet(list(cfg.reward.names), dict(cfg.reward.kwargs),  # names and arguments
                        list(cfg.reward.monitor))
    monitors = rewards.monitors()  # logged only
    preflight.check_model_path(cfg.model)
    preflight.check_prompts_readable(cfg.model, cfg.data.source)
    preflight.check_training_fits(cfg)
    # Last, as they may wait a few seconds on the network: each reward's packages, checkpoints
    # and server (no weights load), then the tracker's login and server.
    rewards.preflight()
    if monitors is not None:
        monitors.preflight()
    check_tracker(cfg.log.wandb)
    return run_dir


def train(cfg: Config, progress: Any = None) -> TrainResult:
    """Run STAGE/GRPO training as configured. ``progress`` is an optional tqdm-like factory."""
    t_start = time.perf_counter()
    engine = distributed.check_launch(cfg)  # a launch that contradicts the recipe fails here
    world = int(os.environ.get("WORLD_SIZE", "1"))
    prompts_local = _local_prompts(cfg, world)
    run_dir = _run_dir(cfg)
    torch.manual_seed(cfg.run.seed)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)

    # --- model (before the accelerator: see distributed.py), optimiser, schedule ------------------
    pair = build_policy(cfg.model, need_reference=needs_reference(cfg))
    policy, reference = pair.policy, pair.reference
    if not any(p.requires_grad for p in policy.parameters()):
        raise UserError("model: no trainable parameters (check model.train_modules / model.lora)")
    accelerator = distributed.make_accelerator(cfg, engine,
                                               prompts_local * cfg.sampling.group_size)
    # every machine sees the run folder, or every rank stops here, before the engine starts
    checkpoint.check_shared_run_dir(accelerator, run_dir, cfg.run.out_dir)
    model, optimizer, base_optimizer = distributed.prepare(
        accelerator, engine, policy,
        lambda params: torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                         eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay))
    # The scheduler is stepped by us once per rollout, not prepared: accelerate's wrapper steps
    # it once per process per call in multi-process runs.
    scheduler = torch.optim.lr_scheduler.LambdaLR(base_optimizer, lr_lambda(cfg))
    accelerator.register_for_checkpointing(scheduler)
    save_kwargs = checkpoint.adapter_only_checkpoints(accelerator, engine) if cfg.model.lora \
        else {}
    policy = distributed.unwrap(accelerator, model)
    if reference is not None:
        reference.to(accelerator.device)
    rewards = RewardSet(list(cfg.reward.names), dict(cfg.reward.kwargs), list(cfg.reward.monitor))
    monitors = rewards.monitors()
    source = build_source(cfg.data.source, cfg.run.seed, cfg.data.shuffle)

    # --- run directory, resume -----------------------------------------------------------------
    state = TrainerState()
    ckpt_root = run_dir / "checkpoints"
    ckpt = checkpoint.agreed_resume_point(accelerator, ckpt_root) if cfg.run.resume else None
    if ckpt is not None:
        state = load_checkpoint(accelerator, ckpt, engine, adapters_only=bool(cfg.model.lora))
        log.info("resumed from %s (step %d)", ckpt, state.step)
    elif cfg.run.resume:  # run.resume_or_start (checkpoint.check_resume)
        log.warning("run.resume=true but no complete checkpoint in %s; starting fresh", ckpt_root)
    main = accelerator.is_main_process
    info = checkpoint.current_run_info(cfg)  # engine, world size, precision, LoRA
    if main:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        checkpoint.write_run_info(run_dir, info)
    tracker = Tracker(run_dir, cfg.log.tensorboard, cfg.log.wandb, cfg.log.wandb_project,
                      config=dataclasses.asdict(cfg), enabled=main)  # W&B records the config
    proxies = [fn for fn in rewards.fns if getattr(fn, "gold", None)]  # scored in evaluations
    eval_before = _evaluate(cfg, policy, accelerator, tracker, state.step, "before", progress,
                            proxies) \
        if state.step == 0 else _read_eval(run_dir, "before")
    # the divergence check's reference
    norm0 = distributed.param_norm(engine, model, accelerator.device)

    # --- the loop ------------------------------------------------------------------------------
    bar = progress(total=cfg.run.steps, initial=state.step, disable=not main) if progress else None
    while state.step < cfg.run.steps:
        step = state.step
        first = state.data_position + accelerator.process_index * prompts_local
        items = source.batch(first, prompts_local)
        t0 = time.perf_counter()
        # Weights gathered once per rollout; sampling, the reference and teacher forcing all run
        # under the same precision rule as the update (accelerate's autocast, a no-op in fp32).
        with distributed.sampling_weights(engine, model), accelerator.autocast():
            ro = rollout(policy, reference, items, first, rewards, cfg,
                         seed=mix_seed(cfg.run.seed, step), train_forward=model,
                         monitors=monitors)
        t1 = time.perf_counter()
        lr = scheduler.get_last_lr()[0]  # the rate this step's update uses; update() steps it
        metrics = update(model, ro, optimizer, scheduler, accelerator, cfg, engine)
        t2 = time.perf_counter()
        state.step += 1
        state.data_position += prompts_local * accelerator.num_processes
        skipped = metrics is None
        state.consecutive_skips = state.consecutive_skips + 1 if skipped else 0
        state.total_skips += int(skipped)
        metrics = distributed.gather_metrics(accelerator, {**ro.metrics, **(metrics or {})})
        metrics.update({"perf/rollout_s": t1 - t0, "perf/update_s": t2 - t1,
                        "perf/samples_per_s": len(ro) * accelerator.num_processes / (t2 - t0),
                        "optim/lr": lr, "train/skipped": float(skipped)})
        if step % cfg.log.every == 0 or state.step == cfg.run.steps:
            tracker.log(state.step, metrics)
        if main and cfg.log.image_every and (step % cfg.log.image_every == 0):
            _log_grid(tracker, ro, state.step, cfg.sampling.group_size)
        _check_health(cfg, state, ro, accelerator, engine, model, norm0, tracker)
        if cfg.log.eval_every and state.step % cfg.log.eval_every == 0 \
                and state.step < cfg.run.steps:
            _evaluate(cfg, policy, accelerator, tracker, state.step, f"step{state.step}",
                      proxies=proxies)
        if cfg.run.save_every and state.step % cfg.run.save_every == 0:
            save_checkpoint(accelerator, ckpt_root, state, to_yaml(cfg), info=info,
                            save_kwargs=save_kwargs)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{metrics.get('reward/total/mean', float('nan')):.3f}",
                            kl=f"{metrics.get('policy/kl_k3', 0.0):.4f}")
    if bar is not None:
        bar.close()

    # --- the end: checkpoint, export, evaluate ---------------------------------------------------
    if latest_checkpoint(ckpt_root) != ckpt_root / f"step_{state.step:06d}":
        save_checkpoint(accelerator, ckpt_root, state, to_yaml(cfg), info=info,
                        save_kwargs=save_kwargs)
    ds_ops.note_export_dtype(cfg, engine, model)  # DeepSpeed's bf16 engine exports bf16
    _export(accelerator, engine, model, policy, run_dir / "final")
    eval_after = _evaluate(cfg, policy, accelerator, tracker, state.step, "after", progress,
                           proxies)
    tracker.close()
    accelerator.wait_for_everyone()
    return TrainResult(run_dir, state.step, state.total_skips, eval_before, eval_after,
                       time.perf_counter() - t_start, policy, model, engine)


def _check_health(cfg: Config, state: TrainerState, ro: Rollout, accelerator: Accelerator,
                  engine: str, model: torch.nn.Module, norm0: float, tracker: Tracker) -> None:
    """Stop a run that cannot learn or has diverged, with the reason, before it saves anything.

    Every rank reaches the same decision (the flags are reduced over processes).
    """
    invalid = distributed.all_ranks_true(accelerator, bool((~ro.reward_valid).any(dim=1).all()))
    no_signal = distributed.all_ranks_true(accelerator, bool((ro.advantages == 0).all()))
    state.no_signal_steps = state.no_signal_steps + 1 if (invalid or no_signal) else 0
    norm = distributed.param_norm(engine, model, accelerator.device)
    reason = None
    if state.consecutive_skips >= cfg.run.max_consecutive_skips:
        reason = (f"{state.consecutive_skips} consecutive steps had a non-finite reward or loss; "
                  f"lower optim.lr or check the reward")
    elif not math.isfinite(norm) or (cfg.run.max_weight_growth > 0
                                     and norm > cfg.run.max_weight_growth * norm0):
        reason = (f"the run diverged: the trainable weights' norm went from {norm0:.4g} to "
                  f"{norm:.4g} (limit run.max_weight_growth={cfg.run.max_weight_growth:g}x); "
                  f"lower optim.lr. No final model was written")
    elif cfg.run.max_no_signal_steps and state.no_signal_steps >= cfg.run.max_no_signal_steps:
        why = ("every sample was invalid for the reward (see reward/<name>/invalid and the "
               "reward's reasons)" if invalid else
               "every group was tied, so every advantage was 0 (a reward that cannot tell the "
               "samples apart, or sampling that draws the same image G times)")
        reason = (f"no reward signal for {state.no_signal_steps} consecutive steps: {why} "
                  f"(run.max_no_signal_steps={cfg.run.max_no_signal_steps})")
    if reason is not None:
        tracker.close()
        raise TrainingStopped(f"stopped at step {state.step}: {reason}")


def update(model: torch.nn.Module, ro: Rollout, optimizer: torch.optim.Optimizer, scheduler: Any,
           accelerator: Accelerator, cfg: Config, engine: str = "single"
           ) -> dict[str, float] | None:
    """mu passes of (micro-batched) policy-gradient + KL steps on one rollout (docs/algorithm.md §4-§6).

    Returns metrics, or None when a non-finite reward/loss/gradient made the step a skip (no
    parameter changes). Every process reaches the same decision.
    """
    if not _all_finite(accelerator, ro.rewards, ro.reward_columns):
        log.warning("non-finite reward; step skipped")
        return None
    a, N = cfg.algo, len(ro)
    if N < cfg.optim.grad_accum:
        raise UserError(f"optim.grad_accum={cfg.optim.grad_accum} exceeds the {N} sequences "
                        f"per process and step")
    # Exactly grad_accum micro-batches per pass, so accelerate's accumulation counter (which
    # decides when DDP syncs and when DeepSpeed steps inside backward) lines up with our passes.
    chunks = torch.arange(N).tensor_split(cfg.optim.grad_accum)
    sums: dict[str, float] = {}
    for _ in range(a.updates_per_rollout):
        optimizer.zero_grad(set_to_none=True)
        for idx in chunks:
            with accelerator.accumulate(model):
                loss, mets = micro_batch_loss(model, ro, idx, cfg, accelerator.autocast)
                if not _all_finite(accelerator, loss.detach()):
                    optimizer.zero_grad(set_to_none=True)
                    log.warning("non-finite loss; step skipped")
                    return None
                # Our micro-batch losses are shares that add up to the rollout's loss; accelerate
                # (and DeepSpeed) divide each by grad_accum as if it were a mean: undo that.
                accelerator.backward(loss * cfg.optim.grad_accum)
            for key, v in mets.items():  # loss/* are shares that add up; the rest are means
                share = 1.0 if key.startswith("loss/") else 1.0 / len(chunks)
                sums[key] = sums.get(key, 0.0) + v * share / a.updates_per_rollout
        grad_norm = distributed.clip_grad_norm(accelerator, engine, model, cfg.optim.grad_clip)
        if not math.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            log.warning("non-finite gradient norm; step skipped")
            return None
        optimizer.step()
        sums["optim/grad_norm"] = sums.get("optim/grad_norm", 0.0) + grad_norm / a.updates_per_rollout
    scheduler.step()
    return sums


def micro_batch_loss(model: torch.nn.Module, ro: Rollout, idx: torch.Tensor, cfg: Config,
                     autocast: Any = contextlib.nullcontext) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch's exact share of the rollout's loss (docs/algorithm.md §7, §6).

    The aggregation's per-token coefficients and the KL's token count come from the whole rollout
    (``Scores.loss_coef``), so the micro-batch losses add up to the full-batch loss whatever
    ``optim.grad_accum`` is. The loss itself is :func:`stagerl.algo.stage_loss`, the function the
    hand-derived tests check.
    """
    a, s = cfg.algo, cfg.sampling
    with autocast():
        stats = model(ro.inputs.select(idx), ro.tokens[idx], logprob_mode=s.logprob_mode,
                      cfg_scale=s.cfg_scale, temperature=s.temperature, chunk_size=s.logprob_chunk)
    ref = ro.ref_logprobs[idx] if ro.ref_logprobs is not None and a.beta > 0 else None
    return algo.stage_loss(stats.logprobs.float(), ro.old_logprobs[idx], ro.advantages[idx],
                           ref_logp=ref, kl_weights=ro.kl_weights[idx], beta=a.beta,
                           kl_estimator=a.kl_estimator, clip_eps_low=a.clip_eps_low,
                           clip_eps_high=a.clip_eps_high, coefficients=ro.scores.loss_coef[idx],
                           num_tokens=float(ro.tokens.numel()), ratio_level=a.ratio_level,
                           kl_bias_correction=a.kl_bias_correction)


# --------------------------------------------------------------------------------------------------
# Helpers: accelerate, schedule, metrics, evaluation.


def _run_dir(cfg: Config) -> Path:
    """``run.out_dir / run.name``, checked (inside out_dir, writable, no other run there unless
    resuming; stagerl.checkpoint.resolve_run_dir), then created."""
    path = resolve_run_dir(cfg.run, cfg.algo.preset)
    checkpoint.check_resume(cfg, path)  # also for callers of train() without the preflight
    path.mkdir(parents=True, exist_ok=True)
    return path


def _local_prompts(cfg: Config, world: int) -> int:
    P = cfg.sampling.prompts_per_step
    if P % world:
        raise UserError(f"sampling.prompts_per_step={P} must be divisible by the number of "
                        f"processes ({world}) so that groups never split across processes")
    return P // world


def lr_lambda(cfg: Config):
    """Warmup then constant / linear-to-0 / cosine-to-0 (the paper: linear, no warmup)."""
    warm, total, kind = cfg.optim.warmup_steps, cfg.run.steps, cfg.optim.schedule

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        frac = min(1.0, (step - warm) / max(1, total - warm))
        if kind == "linear":
            return 1.0 - frac
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        return 1.0

    return f


def _export(accelerator: Accelerator, engine: str, model: torch.nn.Module, policy: Policy,
            path: Path) -> None:
    """Write the final model, loadable by plain ``from_pretrained``; every rank takes part in the
    gather of sharded weights (ZeRO-3, FSDP2), the main rank writes."""
    state_dict = distributed.full_state_dict(accelerator, engine, model)
    if accelerator.is_main_process:
        policy.save_pretrained(str(path), state_dict=state_dict) if state_dict is not None \
            else policy.save_pretrained(str(path))
    accelerator.wait_for_everyone()


def _all_finite(accelerator: Accelerator, *tensors: torch.Tensor) -> bool:
    return distributed.all_ranks_true(accelerator,
                                      all(bool(torch.isfinite(t).all()) for t in tensors))


def _log_grid(tracker: Tracker, ro: Rollout, step: int, G: int) -> None:
    n = min(len(ro), 4 * G)
    labels = [f"R={float(ro.reward_columns[i].sum()):.2f} {ro.prompts[i]}" for i in range(n)]
    tracker.image(step, "rollout", image_grid(ro.images[:n], labels, cols=G))


def _evaluate(cfg: Config, policy: Policy, accelerator: Accelerator, tracker: Tracker, step: int,
              tag: str, progress: Any = None, proxies: list | None = None) -> ShapesEval | None:
    """Held-out shapes evaluation (strict GenEval rules) on the main process, with the run's
    sampling settings and ``log.eval_seed`` (docs/design.md §13: the one shapes evaluation).
    ``proxies``: learned proxy rewards trained on, scored on the same images."""
    if cfg.log.eval_prompts == 0 or not cfg.data.source.startswith("shapes:"):
        return None
    result = None
    if accelerator.is_main_process:
        result = evaluate_suite(policy, cfg.log.eval_suite, cfg.log.eval_prompts,
                                cfg.log.eval_images_per_prompt,
                                SamplingParams.from_config(cfg.sampling), cfg.log.eval_seed,
                                progress=progress)
        for fn in proxies or []:  # a learned proxy trained on: its score on the same images
            pairs = [(im, it) for it, ims in zip(result.items, result.images) for im in ims]
            out = fn([im for im, _ in pairs], [it.prompt for _, it in pairs],
                     [it.metadata for _, it in pairs])
            result.proxy[fn.name] = float(out.scores[out.valid].mean()) if out.valid.any() \
                else float("nan")
        tracker.log(step, {**{f"eval/{k}": v for k, v in result.strict.items()},
                           "eval/lenient_overall": result.lenient["overall"],
                           **{f"eval/proxy/{k}": v for k, v in result.proxy.items()}})
        (tracker.run_dir / f"eval_{tag}.json").write_text(json.dumps(result.to_dict(), indent=1))
    accelerator.wait_for_everyone()
    return result


def _read_eval(run_dir: Path, tag: str) -> ShapesEval | None:
    """A saved evaluation of a resumed run; None (with a warning) when missing or cut short."""
    p = run_dir / f"eval_{tag}.json"
    if not p.is_file():
        return None
    try:
        return ShapesEval.from_dict(json.loads(p.read_text()))
    except (ValueError, OSError, KeyError, TypeError) as err:
        log.warning("ignoring %s: not readable JSON (%s)", p, err)
        return None
