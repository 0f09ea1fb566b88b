"""Janus-Pro behind the policy protocol, on transformers' native ``JanusForConditionalGeneration``.

Where Janus keeps its parts, and the pitfalls of ``generate(generation_mode="image")``, are in
docs/development.md, "Janus in transformers"; this module follows it:

- Image-token logits are ``generation_head(LM trunk([prompt embeddings ; image-token embeddings]))``;
  ``JanusForConditionalGeneration.forward`` only returns *text* logits, so we never call it.
- The unconditional branch is built as Janus builds it (``generate()`` and DeepSeek's reference
  script): every prompt token except BOS and ``<begin_of_image>`` replaced by the pad token, under
  the same attention mask.
- Positions: ``generate()`` passes no ``position_ids``, so left padding takes position slots. Our
  sampler and teacher forcing do the same (the LM then numbers positions ``0..T+L-1``), which is
  what makes sampling-time and teacher-forced log-probs agree.
- Our own CFG loop (DynamicCache) instead of ``generate()``: ``generate()`` silently applies top-k 50
  and keeps only the last step's scores (docs/development.md); we need every step's log-probs.

Shapes: N sequences, T prompt tokens (left-padded), L = h * w image tokens, V image-token
vocabulary, H hidden size, D VQ code dimension.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from stagerl.errors import UserError
from stagerl.policies.registry import PolicyPair, register_policy
from stagerl.policies.base import (LOGPROB_MODES, PromptInputs, SampleOutput, SamplingParams,
                                   TokenStats)
from stagerl.policies.sampling import (behaviour_logits, chunked_token_stats, draw, scored_logits,
                                       token_stats, truncate_logits)  # noqa: F401 (re-exported)
from stagerl.policies.janus_load import (_DTYPES, check_janus_checkpoint,  # noqa: F401
                                         is_adapter_dir, is_janus_dir, load_janus)
from stagerl.policies import janus_lora
from stagerl.policies.janus_lora import (JanusReferenceView, add_cli_args, merge_lora,  # noqa: F401
                                        run_cli)  # add_cli_args/run_cli: `stagerl merge-lora`

__all__ = ["JanusPolicy", "JanusReferenceView", "build_janus", "load_janus", "set_trainable",
           "merge_lora", "add_cli_args", "run_cli", "JANUS_PRO_TEMPLATE"]

log = logging.getLogger(__name__)

# DeepSeek's "deepseek" SFT template with an empty system prompt, as Janus-Pro's text-to-image
# example builds it: "<|User|>: {prompt}\n\n<|Assistant|>:" followed by the image start tag
# (github.com/deepseek-ai/Janus, README "Text-to-Image Generation"). BOS is prepended separately.
JANUS_PRO_TEMPLATE = "<|User|>: {prompt}\n\n<|Assistant|>:"



def _special_ids(model: nn.Module, tokenizer: Any) -> tuple[int, int, int]:
    """(bos, pad, boi) ids: from the generation config where Janus keeps them, else the tokenizer."""
    gen = getattr(model, "generation_config", None)
    bos = getattr(gen, "bos_token_id", None)
    pad = getattr(gen, "pad_token_id", None)
    # generate() reads generation_kwargs["boi_token_id"]; transformers' conversion script sets a
    # plain generation_config.boi_token_id attribute. Accept both.
    boi = (getattr(gen, "generation_kwargs", None) or {}).get("boi_token_id",
                                                              getattr(gen, "boi_token_id", None))
    bos = tokenizer.bos_token_id if bos is None else bos
    pad = tokenizer.pad_token_id if pad is None else pad
    if boi is None:
        boi = tokenizer.convert_tokens_to_ids(getattr(tokenizer, "boi_token", "<begin_of_image>"))
    if bos is None or pad is None or boi is None:
        raise UserError("model.path: the Janus tokenizer defines no BOS, pad or <begin_of_image> "
                        "token; cannot build prompts")
    return int(bos), int(pad), int(boi)


def _hook_managed(module: nn.Module) -> bool:
    """True when an engine materialises ``module``'s weights only around its forward (ZeRO-3)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


class JanusPolicy(nn.Module):
    """Janus-Pro (any size) as a :class:`stagerl.policies.base.Policy`.

    ``model`` is a ``JanusForConditionalGeneration``, or a peft ``PeftModel`` around one (LoRA);
    ``processor`` is its ``JanusProcessor`` (saved beside checkpoints).
    """

    def __init__(self, model: nn.Module, processor: Any, prompt_template: str = JANUS_PRO_TEMPLATE,
                 lora_base: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.prompt_template = prompt_template
        self.lora_base = lora_base  # where the LoRA base weights live (for merge_lora), if any
        self.bos_id, self.pad_id, self.boi_id = _special_ids(self.core, self.tokenizer)
        side = int(self.core.config.vq_config.num_patches)
        if side * side != int(self.core.config.vision_config.num_image_tokens):
            raise UserError(f"model.path: inconsistent Janus config: grid {side}x{side} but "
                            f"num_image_tokens={self.core.config.vision_config.num_image_tokens}")
        self._grid = (side, side)

    # ---- structure -------------------------------------------------------------------------------
    @property
    def core(self) -> nn.Module:
        """The ``JanusForConditionalGeneration`` (under the peft wrapper when LoRA is on)."""
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    @property
    def is_lora(self) -> bool:
        return hasattr(self.model, "disable_adapter")

    @property
    def grid(self) -> tuple[int, int]:
        return self._grid

    @property
    def num_image_tokens(self) -> int:
        return self._grid[0] * self._grid[1]

    def shard_units(self) -> list[nn.Module]:
        """The transformer blocks that FSDP2 shards one by one (the LM's decoder layers)."""
        return list(self.core.model.language_model.layers)

    @property
    def device(self) -> torch.device:
        return self.core.model.generation_head.vision_head.weight.device

    # ---- prompts ---------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> PromptInputs:
        """BOS + template(prompt) + <begin_of_image>, left-padded; the unconditional branch keeps
        only BOS and <begin_of_image> and pads the rest (Janus' own construction)."""
        rows = []
        for p in prompts:
            text = self.prompt_template.format(prompt=p)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            rows.append([self.bos_id] + list(ids) + [self.boi_id])
        width = max(len(r) for r in rows)
        cond = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # [N, T]
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # [N, T]
        for i, r in enumerate(rows):
            cond[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        keep = (cond == self.bos_id) | (cond == self.boi_id)
        uncond = torch.where(keep, cond, torch.full_like(cond, self.pad_id))  # [N, T]
        return PromptInputs(cond, mask, uncond, mask.clone())

    # ---- the LM trunk ----------------------------------------------------------------------------
    def _image_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, l] image ids -> [N, l, H] LM inputs (generation embedding + aligner)."""
        return self.core.prepare_embeddings_for_image_generation(tokens)

    def _trunk(self, ids: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced hidden states that predict each image token: [N, L, H].

        Input is [prompt ; x_1 .. x_{L-1}]; the state at prompt position T-1 predicts x_1.
        """
        n, t = ids.shape
        prompt = self.core.get_input_embeddings()(ids)  # [N, T, H]
        image = self._image_embeddings(tokens[:, :-1]).to(prompt.dtype)  # [N, L-1, H]
        embeds = torch.cat([prompt, image], dim=1)  # [N, T+L-1, H]
        full_mask = torch.cat([mask.long(), mask.new_ones(n, tokens.shape[1] - 1).long()], dim=1)
        out = self.core.model.language_model(inputs_embeds=embeds, attention_mask=full_mask,
                                             use_cache=False)
        return out.last_hidden_state[:, t - 1:]  # [N, L, H]

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., V] fp32 image-token logits."""
        return self.core.model.generation_head(hidden).float()


    # ---- teacher forcing (runs inside the prepared module's forward: DDP/FSDP sync it) ----------
    def forward(self, inputs: PromptInputs, tokens: torch.Tensor, logprob_mode: str = "cond",
                cfg_scale: float = 1.0, temperature: float = 1.0,
                chunk_size: int = 0) -> TokenStats:
        """Teacher-forced log-probs and entropies of ``tokens`` [N, L] under the scored distribution.

        In "cfg" mode the unconditional branch runs without gradients (base.py). With
        ``chunk_size`` > 0 the head + log-softmax run over that many positions at a time, each chunk
        under activation checkpointing, so no [N, L, V] fp32 tensor is ever held (not even for
        backward).
        """
        if logprob_mode not in LOGPROB_MODES:
            raise UserError(f"sampling.logprob_mode: expected one of {LOGPROB_MODES}, "
                            f"got {logprob_mode!r}")
        h_cond = self._trunk(inputs.cond_ids, inputs.cond_mask, tokens)  # [N, L, H]
        h_unc = None
        if logprob_mode == "cfg":
            with torch.no_grad():
                h_unc = self._trunk(inputs.uncond_ids, inputs.uncond_mask, tokens)  # [N, L, H]

        # Under ZeRO-3 the head's weights exist only around the head's own forward; a recompute
        # inside torch.utils.checkpoint would see them released, so the head stays outside it.
        logps, ents = chunked_token_stats(
            self._head, h_cond, h_unc, tokens, logprob_mode, cfg_scale, temperature, chunk_size,
            head_in_checkpoint=not _hook_managed(self.core.model.generation_head))
        return TokenStats(logprobs=logps, entropy=ents)  # [N, L] x2

    # ---- sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, inputs: PromptInputs, params: SamplingParams,
               generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None) -> SampleOutput:
        """CFG sampling with a DynamicCache; one image per row of ``inputs``.

        Same layout as ``generate(generation_mode="image")``: [cond rows ; uncond rows] in one batch,
        no position_ids, raw-logit CFG ``u + s (c - u)``, then temperature, then truncation.
        With the same seed and ``top_k=0`` it draws the same tokens (tests/test_janus.py).
        """
        if params.logprob_mode not in LOGPROB_MODES:
            raise UserError(f"sampling.logprob_mode: expected one of {LOGPROB_MODES}, "
                            f"got {params.logprob_mode!r}")
        return self._sample(inputs, params, generator, noise)

    def _sample(self, inputs: PromptInputs, params: SamplingParams,
                generator: torch.Generator | None, noise: torch.Tensor | None) -> SampleOutput:
        from transformers import DynamicCache, StaticCache

        n, length = len(inputs), self.num_image_tokens
        guided = params.cfg_scale != 1.0 or params.logprob_mode == "cfg"
        ids, mask = inputs.cond_ids, inputs.cond_mask.long()
        if guided:
            ids = torch.cat([ids, inputs.uncond_ids])  # [2N, T]
            mask = torch.cat([mask, inputs.uncond_mask.long()])  # [2N, T]
        lm = self.core.model.language_model
        if params.cache == "static":  # fixed-size buffers: what torch.compile and CUDA graphs need
            cache = StaticCache(config=lm.config, max_cache_len=ids.shape[1] + length)
        else:
            cache = DynamicCache(config=lm.config)
        run = self._compiled_trunk() if params.compile else lm
        embeds = self.core.get_input_embeddings()(ids)  # [B, T, H], B = N or 2N
        tokens = torch.zeros(n, length, dtype=torch.long, device=ids.device)  # [N, L]
        scored = torch.zeros(n, length, device=ids.device)  # [N, L]
        behaviour = torch.zeros(n, length, device=ids.device)  # [N, L]
        entropy = torch.zeros(n, length, device=ids.device)  # [N, L]
        for i in range(length):
            out = run(inputs_embeds=embeds, attention_mask=mask, cache=cache, use_cache=True)
            cache = out.cache
            logits = self._head(out.last_hidden_state[:, -1])  # [B, V]
            cond, unc = (logits[:n], logits[n:]) if guided else (logits, None)
            beh = behaviour_logits(cond, unc, params.cfg_scale, params.temperature,
                                   params.top_k, params.top_p)  # [N, V]
            # softmax + multinomial, as generate() draws (same tokens from the same seed)
            nxt = draw(torch.softmax(beh, dim=-1), generator,
                       None if noise is None else noise[:, i])  # [N]
            tokens[:, i] = nxt
            behaviour[:, i] = torch.log_softmax(beh, -1).gather(-1, nxt[:, None]).squeeze(-1)
            scored[:, i], entropy[:, i] = token_stats(
                scored_logits(cond, unc, params.logprob_mode, params.cfg_scale,
                              params.temperature), nxt)
            step_ids = torch.cat([nxt, nxt]) if guided else nxt
            embeds = self._image_embeddings(step_ids[:, None])  # [B, 1, H]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        return SampleOutput(tokens=tokens, logprobs=scored, behaviour_logprobs=behaviour,
                            entropy=entropy)

    @torch.no_grad()
    def sample_with_generate(self, inputs: PromptInputs, cfg_scale: float) -> torch.Tensor:
        """[N, L] tokens from transformers' own ``generate(generation_mode="image")``, full softmax
        (``top_k=0``; it would silently apply top-k 50). The reference our sampler is checked and
        timed against: from the same global seed both draw the same tokens."""
        return self.core.generate(inputs=inputs.cond_ids, attention_mask=inputs.cond_mask,
                                  generation_mode="image", do_sample=True, top_k=0,
                                  guidance_scale=cfg_scale)

    def _compiled_trunk(self) -> nn.Module:
        """The LM trunk under ``torch.compile`` (built once per policy; ``sampling.compile``)."""
        if getattr(self, "_trunk_compiled", None) is None:
            self._trunk_compiled = torch.compile(self.core.model.language_model, dynamic=True)
        return self._trunk_compiled

    # ---- images and codes -----------------------------------------------------------------------
    @torch.no_grad()
    def code_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, L] ids -> [N, L, D] fp32 L2-normalised VQ codebook vectors (docs/algorithm.md §4)."""
        codebook = self.core.model.vqmodel.quantize.embedding.weight  # [V, D]
        codes = codebook[tokens]  # [N, L, D]
        return F.normalize(codes.float(), dim=-1)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> list[Image.Image]:
        """[N, L] ids -> N RGB images via the VQ decoder; pixels in [-1, 1] mapped to uint8.

        (docs/development.md: ``processor.postprocess`` fails on HWC pixels, so convert ourselves.)
        """
        pixels = self.core.decode_image_tokens(tokens)  # [N, px, px, 3] about [-1, 1]
        u8 = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()
        return [Image.fromarray(a, mode="RGB") for a in u8]

    # ---- checkpoints ----------------------------------------------------------------------------
    def save_pretrained(self, path: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Full model (safetensors) + processor, loadable by plain
        ``JanusForConditionalGeneration.from_pretrained(path)``. With LoRA: the adapter + processor
        (merge with ``stagerl merge-lora``); see :mod:`stagerl.policies.janus_lora`.

        ``state_dict`` is this module's state dict as gathered by the trainer (e.g.
        ``accelerator.get_state_dict`` under ZeRO-3); keys start with ``model.``.
        """
        os.makedirs(path, exist_ok=True)
        inner = None
        if state_dict is not None:
            inner = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
        if self.is_lora:
            janus_lora.save_adapter(self, path, inner)
        else:
            self.core.save_pretrained(path, state_dict=inner)
        self.processor.save_pretrained(path)


# ---- what trains ---------------------------------------------------------------------------------
def set_trainable(model: nn.Module, patterns: list[str]) -> int:
    """Train the parameters whose name matches any regex in ``patterns`` (``re.search`` on names
    such as ``model.language_model.layers.0.mlp.up_proj.weight``); freeze the rest. Returns the
    number of trainable elements. Paper default: ``["language_model"]`` (docs/algorithm.md §8)."""
    try:
        regexes = [re.compile(p) for p in patterns]
    except re.error as err:
        raise UserError(f"model.train_modules: not a valid regex: {err}") from None
    count = 0
    for name, p in model.named_parameters():
        train = any(r.search(name) for r in regexes)
        p.requires_grad_(train)
        count += p.numel() if train else 0
    if count == 0:
        raise UserError(f"model.train_modules: {list(patterns)} matches no Janus parameter "
                        f"(names look like 'model.language_model.layers.0.mlp.up_proj.weight')")
    return count


# ---- loading and the builder ----------------------------------------------------------------------
def _enable_checkpointing(model: nn.Module) -> None:
    """Recompute LM layers in backward. Non-reentrant, so gradients reach the LM even when its
    inputs (frozen embeddings) need none. transformers >= 5.x renamed the method."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _base_model(model_cfg: Any, dtype: torch.dtype) -> tuple[nn.Module, Any, str | None]:
    """(model, processor, base path for LoRA merges) from ``model_cfg``."""
    if model_cfg.tiny_random:
        from stagerl.policies.janus_tiny import build_tiny_janus

        model, processor = build_tiny_janus()
        return model.to(dtype), processor, None
    if is_adapter_dir(model_cfg.path):  # continue from a LoRA checkpoint
        model, processor, base = janus_lora.load_adapter_checkpoint(model_cfg.path, dtype,
                                                                    trainable=model_cfg.lora)
        return model, processor, base
    model, processor = load_janus(model_cfg.path, dtype)
    return model, processor, model_cfg.path


@register_policy("janus", recognise=is_janus_dir)
def build_janus(model_cfg: Any, need_reference: bool) -> PolicyPair:
    """Policy (+ reference) for ``model.kind: janus``.

    Full fine-tuning: ``model_cfg.train_modules`` train, the reference is a frozen deep copy.
    LoRA: only adapter weights train; the reference is the adapter disabled (no weight copy).
    """
    if model_cfg.dtype not in _DTYPES:
        raise UserError(f"model.dtype: expected one of {', '.join(_DTYPES)}, got {model_cfg.dtype!r}")
    model, processor, base = _base_model(model_cfg, _DTYPES[model_cfg.dtype])
    template = model_cfg.prompt_template or JANUS_PRO_TEMPLATE
    if model_cfg.dtype != "float32" and not model_cfg.lora \
            and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        # DeepSpeed keeps fp32 master weights for bf16 params; plain AdamW on bf16 params does not,
        # and updates of lr 5e-6 mostly round away (bf16 has 8 significant bits).
        log.warning("model.dtype=%s with full fine-tuning outside DeepSpeed: the optimizer updates "
                    "%s weights directly; prefer model.dtype=float32 + run.mixed_precision=bf16",
                    model_cfg.dtype, model_cfg.dtype)
    if model_cfg.gradient_checkpointing:
        _enable_checkpointing(model)
    if model_cfg.lora:
        if not hasattr(model, "disable_adapter"):
            model = janus_lora.add_lora(model, model_cfg)
        policy = JanusPolicy(model, processor, template, lora_base=base)
        reference = JanusReferenceView(policy) if need_reference else None
    else:
        if hasattr(model, "merge_and_unload"):  # an adapter checkpoint, trained further in full
            model = model.merge_and_unload()
        set_trainable(model, list(model_cfg.train_modules))
        policy = JanusPolicy(model, processor, template)
        reference = None
        if need_reference:
            import copy

            reference = copy.deepcopy(policy).requires_grad_(False).eval()
    policy.train()  # activation checkpointing only recomputes in training mode (Janus has no dropout)
    n_train = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    log.info("janus policy: %d parameters, %d trainable, grid %s, lora=%s",
             sum(p.numel() for p in policy.parameters()), n_train, policy.grid, model_cfg.lora)
    return PolicyPair(policy=policy, reference=reference)
