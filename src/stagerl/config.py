"""The typed config tree: one dataclass per concern, every field documented.

Load order (later wins): dataclass defaults -> ``algo.preset`` row -> YAML file -> dotted CLI
overrides (``algo.beta=0.01``). Merging and overriding is OmegaConf's structured-config machinery;
this module adds readable errors and range checks (TRL-style documented fields, CleanRL-style typed
config).

Every field carries ``metadata["help"]``; ``stagerl config --help-fields`` prints them all.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from stagerl.algo.entropy import ENTROPY_MODES
from stagerl.algo.kl import KL_ESTIMATORS
from stagerl.algo.losses import LOSS_AGGREGATIONS
from stagerl.algo.weights import PARTNER_SETS
from stagerl.errors import UserError


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help string (mutable defaults go through default_factory)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    kind: str = _f("tiny", "Policy adapter: 'tiny' (built-in shapes-world model) or 'janus' "
                   "(Janus-Pro through transformers).", choices=("tiny", "janus"))
    path: str = _f("builtin:shapes", "Checkpoint to start from: a local directory or a hub id. "
                   "'builtin:shapes' is the shipped shapes-world model under assets/shapes.")
    tiny_random: bool = _f(False, "Janus only: build a tiny randomly initialised Janus from a config "
                           "instead of loading `path` (for offline tests and smoke runs).")
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
    micro_batch: int = _f(0, "Sequences per forward pass in rollout and update; 0 = the whole "
                          "local batch.", min=0)


@dataclass
class RewardConfig:
    names: list[str] = _f(["shapes_strict"], "Registered reward names, combined as R = sum_k w_k r_k.")
    weights: list[float] = _f([], "Weights w_k, one per name; empty = all 1 (the paper).")
    kwargs: dict[str, Any] = _f({}, "Per-reward keyword arguments: {reward_name: {arg: value}}.")
    drop_tied_columns: bool = _f(True, "Drop a reward column whose values are identical within a "
                                 "group before summing (authors' mask_pos_neg, method.md §1).")
    tied_std: float = _f(1e-6, "A column counts as tied within a group when its std <= this.", min=0.0)
    on_invalid: str = _f("skip_group", "What to do with an image a reward could not score: "
                         "'skip_group' (its group gets no gradient) or 'zero' (score it 0).",
                         choices=("skip_group", "zero"))


@dataclass
class AlgoConfig:
    preset: Optional[str] = _f("stage", "Ablation row of the paper's Table 4 (method.md §5): "
                               "vanilla_grpo, plus_ent, stage, wo_kl, wo_ent_kl, or null to set "
                               "every switch by hand. Explicit fields override the preset.")
    partner_set: str = _f("fixed", "Partner set P_i of the similarity reweighting "
                          "(docs/algorithm.md §4.2): 'fixed' = the opposite-sign members; 'parity' "
                          "= the authors' code (zero-advantage members count, and i itself when "
                          "A_i = 0).", choices=PARTNER_SETS)
    adv_eps: float = _f(1e-4, "epsilon in A = (R - mean) / (std + eps) (method.md §1).", min=0.0)
    reweight: bool = _f(True, "Similarity-aware token weights w (method.md §3); off means w = 1.")
    kl_reweight: bool = _f(True, "KL token weights m from c-bar (method.md §4); off means m = 1.")
    entropy_reward: str = _f("max_only", "Entropy reward mode (docs/algorithm.md §3): off, "
                             "max_only (the paper) or all.", choices=ENTROPY_MODES)
    entropy_coef: float = _f(0.4, "lambda, the entropy-reward coefficient.", min=0.0)
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
    name: str = _f("", "Run name; empty = '<preset>-<timestamp>'.")
    resume: bool = _f(False, "Continue from the latest complete checkpoint in the run directory.")
    save_every: int = _f(0, "Checkpoint every N steps (0 = only at the end).", min=0)
    max_consecutive_skips: int = _f(3, "Stop after this many consecutive skipped (non-finite) steps.",
                                    min=1)
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


def _all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type.endswith("Config")
                                                and f.default_factory is not dataclasses.MISSING):
            sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(sub):
                keys += _all_keys(type(sub), name + ".")
                continue
        keys.append(name)
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


def _suggest(key: str) -> str:
    if "." not in key:  # a section name
        sections = [f.name for f in dataclasses.fields(Config)]
        close = difflib.get_close_matches(key, sections, n=1, cutoff=0.5)
        return f" Did you mean '{close[0]}'?" if close else f" Sections: {', '.join(sections)}"
    close = difflib.get_close_matches(key, _all_keys(), n=1, cutoff=0.5)
    if not close:  # try the last component against every leaf name
        leaf = key.split(".")[-1]
        close = [k for k in _all_keys() if k.split(".")[-1] in
                 difflib.get_close_matches(leaf, [k.split(".")[-1] for k in _all_keys()], n=1)]
    return f" Did you mean '{close[0]}'?" if close else ""


def _omegaconf_error(err: OmegaConfBaseException, origin: str) -> UserError:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, ConfigKeyError) or "not in struct" in str(err) or "Key '" in str(err):
        return UserError(f"{origin}: unknown config key '{key}'.{_suggest(key)}")
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return UserError(f"{origin}: bad value for '{key}': {msg}")
    return UserError(f"{origin}: {str(err).splitlines()[0]}")


def _load_yaml(path: str) -> DictConfig:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.load(p)
    except Exception as err:  # yaml.YAMLError and friends
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{path}: not valid YAML: {first}") from None
    if not isinstance(cfg, DictConfig):
        raise UserError(f"{path}: a config file must be a mapping of sections")
    return cfg


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for o in overrides:
        if "=" not in o or o.startswith("="):
            raise UserError(f"bad override {o!r}: expected dotted.key=value, e.g. algo.beta=0.01")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise UserError(f"bad override: {str(err).splitlines()[0]}") from None


def _merge(layers: list[tuple[str, Any]]) -> DictConfig:
    cfg = OmegaConf.structured(Config)
    for origin, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            raise _omegaconf_error(err, origin) from None
    return cfg


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Defaults <- preset <- YAML file <- dotted overrides; validated. Raises UserError."""
    layers: list[tuple[str, Any]] = []
    if path:
        layers.append((path, _load_yaml(path)))
    if overrides:
        layers.append(("command line", _parse_overrides(overrides)))
    merged = _merge(layers)
    preset = merged.algo.preset
    if preset is not None:
        from stagerl.algo.presets import get_preset

        try:
            row = get_preset(preset)
        except KeyError as err:
            raise UserError(f"algo.preset: {err.args[0]}") from None
        merged = _merge([(f"preset {preset}", {"algo": row})] + layers)
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Range/choice checks from field metadata, plus cross-field rules."""
    if str(cfg.algo.entropy_reward) in ("False", "false"):  # YAML reads a bare `off` as False
        cfg.algo.entropy_reward = "off"
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        for f in dataclasses.fields(sub):
            v = getattr(sub, f.name)
            key = f"{section.name}.{f.name}"
            meta = f.metadata
            if v is None:
                continue
            if "choices" in meta and v not in meta["choices"]:
                raise UserError(f"{key}: expected one of {', '.join(meta['choices'])}, got {v!r}")
            if "min" in meta and isinstance(v, (int, float)) and v < meta["min"]:
                raise UserError(f"{key}: expected a value >= {meta['min']}, got {v!r}")
            if "max" in meta and isinstance(v, (int, float)) and v > meta["max"]:
                raise UserError(f"{key}: expected a value <= {meta['max']}, got {v!r}")
    r = cfg.reward
    if r.weights and len(r.weights) != len(r.names):
        raise UserError(f"reward.weights: expected {len(r.names)} weights (one per reward.names "
                        f"entry), got {len(r.weights)}")
    if not r.names:
        raise UserError("reward.names: expected at least one reward name")
    if len(cfg.optim.betas) != 2:
        raise UserError(f"optim.betas: expected two numbers, got {list(cfg.optim.betas)}")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg))


def needs_reference(cfg: Config) -> bool:
    """A reference policy is needed for the KL term or the entropy reward (issue 4)."""
    return cfg.algo.beta > 0 or cfg.algo.entropy_reward != "off"


def as_container(value: Any) -> Any:
    """Plain Python containers from OmegaConf nodes (for kwargs handed to libraries)."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value
