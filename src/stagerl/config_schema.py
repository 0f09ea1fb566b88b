"""The typed config tree: one dataclass per concern, every field documented (TRL-style documented
fields, CleanRL-style typed config). Loading, merging and validating it is :mod:`stagerl.config`.

Every field carries ``metadata["help"]``; ``stagerl config --fields`` prints them all. Choices come
from the registries (KL estimators, loss aggregations, entropy modes, partner sets, model kinds).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from stagerl.algo.advantages import ADV_SCALES
from stagerl.algo.entropy import ENTROPY_MODES, ENTROPY_TIED
from stagerl.algo.kl import KL_ESTIMATORS
from stagerl.algo.losses import LOSS_AGGREGATIONS, RATIO_LEVELS
from stagerl.algo.weights import PARTNER_SETS
from stagerl.data import EVAL_SEED
from stagerl.policies import policy_kinds


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help string (mutable defaults go through default_factory)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    kind: str = _f("tiny", "Policy adapter: 'tiny' (built-in shapes-world model), 'janus' "
                   "(Janus-Pro through transformers) or 'llamagen' (LlamaGen c2i/t2i, "
                   "docs/llamagen.md).", choices=policy_kinds())
    path: str = _f("builtin:shapes", "Checkpoint to start from: a local directory or a hub id. "
                   "'builtin:shapes' is the shipped shapes-world model under assets/shapes.")
    tiny_random: bool = _f(False, "Janus and LlamaGen: build a tiny randomly initialised model from "
                           "a config instead of loading `path` (for offline tests and smoke runs).")
    prompt_template: str = _f("", "Janus only: how a prompt becomes the model's text input; must "
                              "contain {prompt}. Empty = DeepSeek's chat template for Janus-Pro "
                              "('<|User|>: {prompt}\\n\\n<|Assistant|>:'). The paper's recipes use "
                              "the authors' 'User: {prompt}\\n\\nAssistant:' (docs/janus.md).")
    dtype: str = _f("float32", "Parameter dtype: float32, bfloat16 or float16.",
                    choices=("float32", "bfloat16", "float16"))
    train_modules: list[str] = _f(["language_model"], "Janus only: submodule name patterns that "
                                  "train; everything else is frozen (paper: the LM only).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    lora: bool = _f(False, "Train LoRA adapters (peft) instead of full weights. The reference policy "
                    "is then the adapter disabled: no second copy of the weights.")
    lora_r: int = _f(16, "LoRA rank.", min=1)
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / r).", min=1)
    lora_dropout: float = _f(0.0, "LoRA dropout.", min=0.0, max=1.0)
    lora_target_modules: str = _f(
        r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
        "LoRA target modules: a regex over module names (default: the language model only).")
    llamagen_type: str = _f("t2i", "LlamaGen only: 't2i' (caption through a T5 encoder) or 'c2i' "
                            "(a class id or class name per prompt).", choices=("t2i", "c2i"))
    llamagen_size: str = _f("XL", "LlamaGen only: GPT size as the official configs define it: B, L, "
                            "XL, XXL or 3B (checked against the weights).",
                            choices=("B", "L", "XL", "XXL", "3B"))
    image_size: int = _f(256, "LlamaGen only: image side in pixels, 256, 384 or 512 (VQ-16: 16x16, "
                         "24x24 or 32x32 tokens).")
    vq_path: str = _f("", "LlamaGen only: the VQ-16 tokenizer weights (official .pt or "
                      "safetensors); unused for a folder saved by stagerl.")
    t5_path: str = _f("google/flan-t5-xl", "LlamaGen t2i only: the T5 encoder (folder or hub id) "
                      "whose features the GPT reads; LlamaGen's t2i models use FLAN-T5-XL.")
    class_names: str = _f("", "LlamaGen c2i only: a text file, one class per line (line i = class "
                          "i, commas separate synonyms), so that prompts may name classes; without "
                          "it prompts must be class ids.")


@dataclass
class DataConfig:
    source: str = _f("shapes:train", "Training prompts: 'shapes:<split>' (procedural shapes world) or "
                     "a path to a .txt (one prompt a line), .jsonl (GenEval metadata lines) or .csv.")
    shuffle: bool = _f(True, "Shuffle file-based prompt sources every epoch.")


@dataclass
class SamplingConfig:
    prompts_per_step: int = _f(8, "P: prompts per rollout (over all processes).", min=1)
    group_size: int = _f(8, "G: samples per prompt; advantages are normalised within a group.", min=2)
    cfg_scale: float = _f(2.0, "Classifier-free guidance s in u + s(c - u); 1 disables guidance.",
                          min=0.0)
    temperature: float = _f(1.0, "Sampling temperature.", min=1e-4)
    top_k: int = _f(0, "Top-k truncation at sampling time; 0 = off.", min=0)
    top_p: float = _f(1.0, "Nucleus (top-p) truncation at sampling time; 1 = off.", min=0.0, max=1.0)
    logprob_mode: str = _f("cond", "Distribution scored by the loss/KL/entropy: 'cond' = conditional "
                           "logits only (the paper), 'cfg' = guided logits with the unconditional "
                           "branch detached.", choices=("cond", "cfg"))
    logprob_chunk: int = _f(0, "Positions per chunk when computing log-probs/entropies, so that "
                            "[N, L, V] fp32 is never materialised at once; 0 = all at once.", min=0)
    cache: str = _f("dynamic", "Janus only: KV cache of the sampler: 'dynamic' (grows per token) or "
                    "'static' (fixed-size buffers, as generate() uses; what torch.compile and "
                    "CUDA graphs need). Same tokens either way.", choices=("dynamic", "static"))
    compile: bool = _f(False, "Janus only: torch.compile the sampler's decode step (pays a "
                       "one-time compile, tens of seconds; pays off on GPUs; best with "
                       "sampling.cache=static).")
    reuse_sample_stats: bool = _f(True, "Take the rollout's old log-probs and entropies from the "
                                  "sampling pass, which already computes the scored distribution, "
                                  "instead of a second teacher-forced pass of the policy (same "
                                  "values; tests/test_rollout_reuse.py). false = recompute them "
                                  "and log rollout/logprob_gap (a check of the adapter).")
    micro_batch: int = _f(0, "Sequences per forward pass in rollout and update; 0 = the whole "
                          "local batch.", min=0)


@dataclass
class RewardConfig:
    names: list[str] = _f(["shapes_strict"], "Registered reward names, combined as R = sum_k w_k r_k.")
    weights: list[float] = _f([], "Weights w_k, one per name; empty = all 1 (the paper).")
    kwargs: dict[str, Any] = _f({}, "Per-reward keyword arguments: {reward_name: {arg: value}}.")
    monitor: list[str] = _f([], "Rewards scored on every rollout and logged as "
                            "monitor/<name>/mean, never trained on (arguments from "
                            "reward.kwargs). A learned proxy reward adds its gold rewards "
                            "(shapes_strict, shapes_lenient) itself (docs/rewards.md).")
    drop_tied_columns: bool = _f(True, "Drop a reward column whose values are identical within a "
                                 "group before summing (authors' mask_pos_neg, docs/algorithm.md §2).")
    tied_std: float = _f(1e-6, "A column counts as tied within a group when its std <= this.", min=0.0)
    on_invalid: str = _f("skip_group", "What to do with an image a reward could not score: "
                         "'skip_group' (its group gets no gradient) or 'zero' (score it 0).",
                         choices=("skip_group", "zero"))


@dataclass
class AlgoConfig:
    preset: Optional[str] = _f("stage", "Ablation row of the paper's Table 4 (docs/algorithm.md §7): "
                               "vanilla_grpo, plus_ent, stage, wo_kl, wo_ent_kl; or a peer "
                               "method: gcpo (docs/algorithm.md §11), dr_grpo (§10); or null to "
                               "set every switch by hand. Explicit fields override the preset.")
    partner_set: str = _f("fixed", "Partner set P_i of the similarity reweighting "
                          "(docs/algorithm.md §4.2): 'fixed' = the opposite-sign members; 'parity' "
                          "= the authors' code (zero-advantage members count, and i itself when "
                          "A_i = 0).", choices=PARTNER_SETS)
    adv_eps: float = _f(1e-4, "epsilon in A = (R - mean) / (std + eps) (docs/algorithm.md §2).", min=0.0)
    reweight: bool = _f(True, "Similarity-aware token weights w (docs/algorithm.md §4); off means w = 1.")
    kl_reweight: bool = _f(True, "KL token weights m from c-bar (docs/algorithm.md §6); off means m = 1.")
    entropy_reward: str = _f("max_only", "Entropy reward mode (docs/algorithm.md §3): off, "
                             "max_only (the paper) or all.", choices=ENTROPY_MODES)
    entropy_coef: float = _f(0.4, "lambda, the entropy-reward coefficient.", min=0.0)
    entropy_tied: str = _f("keep", "What a prompt group tied on the combined reward gets from the "
                           "entropy reward (docs/algorithm.md §3): 'keep' (the authors') = the "
                           "bonus, which the tiny group std then scales to a full-size advantage; "
                           "'drop' = no bonus, so the group's advantages are exactly 0.",
                           choices=ENTROPY_TIED)
    beta: float = _f(0.03, "beta, the KL coefficient; 0 disables the KL term.", min=0.0)
    kl_estimator: str = _f("k3", "KL estimator (Schulman's k1, k2 or k3; docs/algorithm.md §6).",
                           choices=tuple(KL_ESTIMATORS))
    loss_agg: str = _f("group_weighted_mean", "Policy-loss aggregation (docs/algorithm.md §5): "
                       "group_weighted_mean (the authors' runs: each group's sum(w A rho) / sum(w), "
                       "then the mean over groups; with w = 1 each group's token mean), "
                       "batch_weighted_mean (one sum(w) over the whole local batch), token_mean, "
                       "seq_mean, or constant (Dr. GRPO).", choices=tuple(LOSS_AGGREGATIONS))
    updates_per_rollout: int = _f(1, "mu: optimisation passes over each rollout.", min=1)
    clip_eps_low: Optional[float] = _f(None, "PPO ratio clip epsilon_low; null = no clipping.",
                                       min=0.0)
    clip_eps_high: Optional[float] = _f(None, "PPO ratio clip epsilon_high; null = epsilon_low.",
                                        min=0.0)
    adv_scale: str = _f("group", "Advantage denominator (TRL's scale_rewards, docs/algorithm.md "
                        "§10): 'group' = std of the prompt group + eps, 'batch' = one std over "
                        "the local batch + eps, 'none' = no division (Dr. GRPO).",
                        choices=ADV_SCALES)
    ratio_level: str = _f("token", "Importance ratio (TRL's importance_sampling_level, "
                          "docs/algorithm.md §10): 'token' = exp(l - l_old) per token, "
                          "'sequence' = exp of its mean over the sequence (GSPO). 'sequence' "
                          "cannot take per-token weights (algo.reweight, algo.token_select).",
                          choices=RATIO_LEVELS)
    kl_bias_correction: bool = _f(False, "Multiply each token's KL by its importance ratio "
                                  "(TRL's use_bias_correction_kl, docs/algorithm.md §10). "
                                  "With one update per rollout rho = 1 but its gradient is not 0, "
                                  "so the KL gradient changes.")
    token_select: str = _f("all", "Tokens that carry the loss (docs/algorithm.md §11): 'all', or "
                           "'gcpo' = GCPO's critical tokens with its dynamic advantage weight "
                           "(set by algo.preset=gcpo; needs a reference, no STAGE weights).",
                           choices=("all", "gcpo"))
    gcpo_frac: float = _f(0.1, "GCPO: fraction f of the L tokens in each of its three sets "
                          "(causal, entropy gradient, diversity; docs/algorithm.md §11).",
                          min=0.0, max=1.0 / 3)
    gcpo_kappa_clip: float = _f(0.5, "GCPO: c in the dynamic advantage weight, the running mean "
                                "of exp(clip(l - l_ref, -c, c)) (docs/algorithm.md §11).", min=0.0)


@dataclass
class OptimConfig:
    lr: float = _f(1e-4, "AdamW learning rate (peak).", min=0.0)
    weight_decay: float = _f(0.0, "AdamW weight decay.", min=0.0)
    betas: list[float] = _f([0.9, 0.999], "AdamW betas.")
    eps: float = _f(1e-8, "AdamW epsilon.", min=0.0)
    grad_clip: float = _f(1.0, "Max global gradient norm; 0 = no clipping.", min=0.0)
    schedule: str = _f("linear", "LR schedule after warmup: constant, linear (to 0) or cosine.",
                       choices=("constant", "linear", "cosine"))
    warmup_steps: int = _f(0, "Linear warmup steps.", min=0)
    grad_accum: int = _f(1, "Micro-batches accumulated per optimizer step.", min=1)


@dataclass
class RunConfig:
    steps: int = _f(200, "Training steps (one rollout + mu updates each).", min=1)
    seed: int = _f(0, "Global seed (sampling, data order, init).")
    out_dir: str = _f("runs", "Parent folder of run directories.")
    name: str = _f("", "Run folder inside run.out_dir; empty = '<algo.preset>-seed<run.seed>' "
                   "(e.g. stage-seed0). A folder that already holds a run is refused unless "
                   "run.resume=true (--resume); the name cannot lead outside run.out_dir.")
    resume: bool = _f(False, "Continue from the latest complete checkpoint in the run directory; "
                      "a run folder without one is an error (see run.resume_or_start).")
    resume_or_start: bool = _f(False, "With run.resume=true: start from step 0 when the run folder "
                               "holds no complete checkpoint, instead of stopping with an error.")
    save_every: int = _f(0, "Checkpoint every N steps (0 = only at the end).", min=0)
    max_consecutive_skips: int = _f(3, "Stop after this many consecutive skipped (non-finite) steps.",
                                    min=1)
    max_no_signal_steps: int = _f(20, "Stop after this many consecutive steps without reward "
                                  "signal (every sample invalid, or every group tied so every "
                                  "advantage is 0); 0 = never stop for this.", min=0)
    max_weight_growth: float = _f(10.0, "Stop (and write no final/) when the trainable weights' "
                                  "norm exceeds this many times its starting value, or is not "
                                  "finite: the run diverged; 0 = only the finiteness check.",
                                  min=0.0)
    threads: int = _f(0, "torch intra-op threads; 0 = leave torch's default.", min=0)
    mixed_precision: str = _f("no", "accelerate mixed precision: no, bf16 or fp16.",
                              choices=("no", "bf16", "fp16"))
    cpu: bool = _f(False, "Force CPU even when a GPU is visible.")


@dataclass
class LogConfig:
    every: int = _f(1, "Write metrics every N steps.", min=1)
    tensorboard: bool = _f(True, "Write TensorBoard event files.")
    wandb: bool = _f(False, "Log to Weights & Biases (needs the 'wandb' extra).")
    wandb_project: str = _f("stagerl", "W&B project name.")
    image_every: int = _f(20, "Write a prompt-labelled image grid every N steps; 0 = never.", min=0)
    eval_every: int = _f(0, "Run the held-out evaluation every N steps; 0 = only before and after.",
                         min=0)
    eval_prompts: int = _f(200, "Held-out prompts for the before/after evaluation (shapes sources "
                           "only); 0 = no evaluation.", min=0)
    eval_images_per_prompt: int = _f(4, "Images per held-out prompt.", min=1)
    eval_suite: str = _f("heldout", "Shapes suite for in-run evaluation (see `stagerl eval --help`).")
    eval_seed: int = _f(EVAL_SEED, "Seed of the evaluation prompts and of sampling them, for in-run "
                        "evaluation and the default of `stagerl eval --seed`; one seed gives every "
                        "model the same prompts and noise.", min=0, max=2 ** 63 - 1)
    progress: bool = _f(True, "Show a progress bar with ETA.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    log: LogConfig = field(default_factory=LogConfig)


# --------------------------------------------------------------------------------------------------
# Loading, with errors a user can act on.


def sub_config(f: dataclasses.Field) -> type | None:
    """The dataclass of a section field (``run: RunConfig``), or None for a value field."""
    if f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
        return None
    sub = f.default_factory()  # type: ignore[misc]
    return type(sub) if dataclasses.is_dataclass(sub) else None


def _all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        sub = sub_config(f)
        keys += _all_keys(sub, f"{prefix}{f.name}.") if sub else [f"{prefix}{f.name}"]
    return keys


def field_help() -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field, for docs and ``--help-fields``."""
    rows = []
    for section in dataclasses.fields(Config):
        sub = section.default_factory()
        for f in dataclasses.fields(sub):
            rows.append((f"{section.name}.{f.name}", repr(getattr(sub, f.name)),
                         f.metadata.get("help", "")))
    return rows
