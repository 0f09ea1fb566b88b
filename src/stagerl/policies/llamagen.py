"""LlamaGen (class- and text-to-image) behind the policy protocol (docs/llamagen.md).

The networks are :mod:`stagerl.policies.llamagen_model`; the checkpoint checks are
:mod:`stagerl.policies.llamagen_load`. This module turns them into a
:class:`stagerl.policies.base.Policy`:

- **prompts** -- c2i: a prompt is a class index ("207") or a name from ``model.class_names``; the
  unconditional branch is the class-dropout row. t2i: the caption goes through a T5 encoder
  (``model.t5_path``), padded to the GPT's caption slots, then *left*-padded with the pads zeroed
  and masked as keys (what LlamaGen's own sampler does); the unconditional branch is the learnt
  null caption under the same key mask;
- **sampling** -- the two CFG branches as one batch of 2N rows with a KV cache, the shared
  sampling math (:mod:`stagerl.policies.sampling`): raw-logit CFG ``u + s (c - u)``, temperature,
  truncation; tokens drawn by ``torch.multinomial`` from a generator, so that with the same seed
  it draws what LlamaGen's ``generate()`` draws (tests/test_llamagen_parity.py);
- **teacher forcing** -- the same trunk over [prefix ; x_1 .. x_{L-1}], logits chunked by
  ``sampling.logprob_chunk``;
- **codes, images** -- the VQ codebook vectors, L2-normalised; the VQ decoder;
- **LoRA** -- own low-rank layers (the base keys keep the official names); the reference is the
  adapter disabled;
- **save / load** -- stagerl's format: ``config.json`` + ``model.safetensors`` (GPT, official
  names, plus any LoRA weights) + ``vq.safetensors`` (+ ``t5/`` when the text encoder has no path
  of its own). The T5 encoder is frozen and kept outside the module tree, so no engine shards,
  syncs or exports it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from stagerl.errors import UserError
from stagerl.policies.base import (LOGPROB_MODES, PromptInputs, SampleOutput, SamplingParams,
                                   TokenStats)
from stagerl.policies.llamagen_cond import (TextEncoder, class_index, class_lookup,
                                            load_text_encoder, read_class_names)
from stagerl.policies.llamagen_load import (_CONFIG, FORMAT, check_gpt, check_vq, is_stagerl_dir,
                                            load_strict, read_state_dict)
from stagerl.policies.llamagen_model import (IMAGE_SIZES, SIZES, GPTConfig, KVCache, LlamaGenGPT,
                                             add_lora, gpt_config_for, rope_table)
from stagerl.policies.llamagen_vq import VQConfig, VQModel
from stagerl.policies.registry import PolicyPair, register_policy
from stagerl.policies.sampling import (behaviour_logits, chunked_token_stats, draw, scored_logits,
                                       token_stats)

log = logging.getLogger(__name__)

_GPT, _VQ, _T5 = "model.safetensors", "vq.safetensors", "t5"
TYPES = ("t2i", "c2i")
# LoRA targets when model.lora_target_modules keeps its (Janus) default: every attention and MLP
# projection of the GPT blocks.
LORA_TARGETS = r"layers\.\d+\.(attention\.(wqkv|wo)|feed_forward\.(w1|w2|w3))"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _hook_managed(module: nn.Module) -> bool:
    """True when an engine materialises ``module``'s weights only around its forward (ZeRO-3)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


class LlamaGenPolicy(nn.Module):
    """LlamaGen (any size, c2i or t2i) as a :class:`stagerl.policies.base.Policy`."""

    def __init__(self, model: LlamaGenGPT, vq: VQModel, text: TextEncoder | None = None,
                 class_names: list[str] | None = None) -> None:
        super().__init__()
        self.model = model
        self.vq = vq.eval().requires_grad_(False)
        self._text = [text]  # in a list: not a registered submodule
        self.class_names = list(class_names or [])
        if model.cfg.model_type == "t2i" and text is None:
            raise ValueError("a t2i LlamaGen policy needs a text encoder")
        self._lookup = class_lookup(self.class_names)

    # ---- structure -------------------------------------------------------------------------------
    @property
    def cfg(self) -> GPTConfig:
        return self.model.cfg

    @property
    def text(self) -> TextEncoder | None:
        return self._text[0]

    @property
    def is_lora(self) -> bool:
        return bool(self.model.lora_modules())

    @property
    def grid(self) -> tuple[int, int]:
        return self.cfg.grid, self.cfg.grid

    @property
    def num_image_tokens(self) -> int:
        return self.cfg.grid ** 2

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    def shard_units(self) -> list[nn.Module]:
        """The transformer blocks that FSDP2 shards one by one."""
        return list(self.model.layers)

    def train(self, mode: bool = True) -> "LlamaGenPolicy":
        super().train(mode)
        self.vq.eval()  # frozen tokenizer: no dropout, whatever the policy's mode
        return self

    # ---- prompts ---------------------------------------------------------------------------------
    def class_id(self, prompt: str) -> int:
        """A c2i prompt -> class index: an integer, or a name from ``model.class_names``."""
        return class_index(prompt, self._lookup, self.cfg.num_classes)

    def encode_prompts(self, prompts: list[str]) -> PromptInputs:
        dev, n = self.device, len(prompts)
        if self.cfg.model_type == "c2i":
            ids = torch.tensor([[self.class_id(p)] for p in prompts], dtype=torch.long, device=dev)
            ones = torch.ones(n, 1, dtype=torch.long, device=dev)
            return PromptInputs(ids, ones, torch.full_like(ids, self.cfg.num_classes), ones.clone())
        ids, mask, feats = self.text.features(list(prompts), self.cfg.cls_token_num, dev)
        return PromptInputs(ids, mask, torch.zeros_like(ids), mask.clone(), {"caption": feats})

    def _prefix(self, inputs: PromptInputs, uncond: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(prefix embeddings [N, T, D], key mask [N, T] bool) of one CFG branch."""
        cond = inputs.cond_ids if self.cfg.model_type == "c2i" else inputs.extra["caption"]
        mask = inputs.uncond_mask if uncond else inputs.cond_mask
        return self.model.prefix(cond, uncond), mask.bool()

    # ---- teacher forcing -------------------------------------------------------------------------
    def _hidden(self, inputs: PromptInputs, tokens: torch.Tensor, uncond: bool) -> torch.Tensor:
        """[N, L, D] final hidden states; row t predicts image token t."""
        prefix, key_ok = self._prefix(inputs, uncond)
        x = torch.cat([prefix, self.model.tok_embeddings(tokens[:, :-1])], dim=1)
        key_ok = torch.cat([key_ok, key_ok.new_ones(tokens.shape[0], tokens.shape[1] - 1)], dim=1)
        return self.model.run(x, key_ok)[:, prefix.shape[1] - 1:]

    def image_logits(self, inputs: PromptInputs, tokens: torch.Tensor,
                     uncond: bool = False) -> torch.Tensor:
        """Teacher-forced logits [N, L, V] (fp32) of one branch (parity tests, pretraining)."""
        return self.model.head(self._hidden(inputs, tokens, uncond))

    def forward(self, inputs: PromptInputs, tokens: torch.Tensor, logprob_mode: str = "cond",
                cfg_scale: float = 1.0, temperature: float = 1.0,
                chunk_size: int = 0) -> TokenStats:
        """Teacher-forced log-probs and entropies of ``tokens`` [N, L], scored distribution."""
        if logprob_mode not in LOGPROB_MODES:
            raise UserError(f"sampling.logprob_mode: expected one of {LOGPROB_MODES}, "
                            f"got {logprob_mode!r}")
        h_cond = self._hidden(inputs, tokens, uncond=False)
        h_unc = None
        if logprob_mode == "cfg" and cfg_scale != 1.0:
            with torch.no_grad():
                h_unc = self._hidden(inputs, tokens, uncond=True)
        mode = "cfg" if h_unc is not None else "cond"
        logps, ents = chunked_token_stats(
            self.model.head, h_cond, h_unc, tokens, mode, cfg_scale, temperature, chunk_size,
            head_in_checkpoint=not _hook_managed(self.model.output))
        return TokenStats(logprobs=logps, entropy=ents)

    # ---- sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, inputs: PromptInputs, params: SamplingParams,
               generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None) -> SampleOutput:
        """CFG sampling with a KV cache; one image per row of ``inputs`` (see the module doc)."""
        if params.logprob_mode not in LOGPROB_MODES:
            raise UserError(f"sampling.logprob_mode: expected one of {LOGPROB_MODES}, "
                            f"got {params.logprob_mode!r}")
        n, length, s = len(inputs), self.num_image_tokens, float(params.cfg_scale)
        guided = s != 1.0
        prefix, key_ok = self._prefix(inputs, uncond=False)
        if guided:
            up, uk = self._prefix(inputs, uncond=True)
            prefix, key_ok = torch.cat([prefix, up]), torch.cat([key_ok, uk])
        b, t = key_ok.shape
        key_ok = torch.cat([key_ok, key_ok.new_ones(b, length)], dim=1)  # [B, T + L]
        cache = KVCache(self.cfg, b, t + length - 1, prefix)
        dev = prefix.device
        tokens = torch.zeros(n, length, dtype=torch.long, device=dev)
        scored, behaviour, entropy = (torch.zeros(n, length, device=dev) for _ in range(3))
        h = self.model.run(prefix, key_ok, cache)[:, -1]
        for i in range(length):
            logits = self.model.head(h)  # [B, V]
            cond, unc = (logits[:n], logits[n:]) if guided else (logits, None)
            beh = behaviour_logits(cond, unc, s, params.temperature, params.top_k, params.top_p)
            nxt = draw(torch.softmax(beh, dim=-1), generator,
                       None if noise is None else noise[:, i])  # [N]
            tokens[:, i] = nxt
            behaviour[:, i] = torch.log_softmax(beh, -1).gather(-1, nxt[:, None])[:, 0]
            scored[:, i], entropy[:, i] = token_stats(
                scored_logits(cond, unc, params.logprob_mode, s, params.temperature), nxt)
            if i + 1 < length:
                step = torch.cat([nxt, nxt]) if guided else nxt
                h = self.model.run(self.model.tok_embeddings(step[:, None]), key_ok, cache)[:, -1]
        return SampleOutput(tokens=tokens, logprobs=scored, behaviour_logprobs=behaviour,
                            entropy=entropy)

    # ---- codes and images -----------------------------------------------------------------------
    @torch.no_grad()
    def code_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, L] ids -> [N, L, D] fp32 L2-normalised VQ codebook vectors (docs/algorithm.md §4)."""
        return F.normalize(self.vq.quantize.embedding.weight.float(), dim=-1)[tokens]

    @torch.no_grad()
    def decode_pixels(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, L] ids -> [N, 3, H, W] decoder output, about [-1, 1]."""
        return self.vq.decode_codes(tokens, self.grid)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> list[Image.Image]:
        """[N, L] ids -> N RGB images ([-1, 1] mapped to uint8 as LlamaGen saves its samples)."""
        px = self.decode_pixels(tokens).float().clamp(-1, 1).permute(0, 2, 3, 1)
        u8 = ((px + 1) * 127.5).round().byte().cpu().numpy()
        return [Image.fromarray(a, mode="RGB") for a in u8]

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] pixels in [-1, 1] -> [N, L] VQ ids (the tokenizer's encoder)."""
        return self.vq.encode_codes(pixels.to(self.device, self.vq.quant_conv.weight.dtype))

    # ---- checkpoints ----------------------------------------------------------------------------
    def save_pretrained(self, path: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """stagerl's format (module doc); ``state_dict`` = this module's state dict as gathered by
        the trainer (keys ``model.*`` and ``vq.*``)."""
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        sd = state_dict if state_dict is not None else self.state_dict()

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v.detach().cpu().contiguous() for k, v in sd.items()
                    if k.startswith(prefix)}

        save_file(part("model."), str(out / _GPT), metadata={"format": FORMAT})
        save_file(part("vq."), str(out / _VQ), metadata={"format": FORMAT})
        t5 = None
        if self.text is not None:
            t5 = self.text.source
            if t5 is None:
                self.text.model.save_pretrained(str(out / _T5))
                self.text.tokenizer.save_pretrained(str(out / _T5))
                t5 = _T5
        lora = None
        if self.is_lora:
            m = self.model.lora_modules()[0]
            lora = {"r": int(m.lora_A.shape[0]), "alpha": float(m.scale * m.lora_A.shape[0]),
                    "targets": [n for n, x in self.model.named_modules() if x in
                                set(self.model.lora_modules())]}
        config = {"format": FORMAT, "gpt": dataclasses.asdict(self.cfg),
                  "vq": dataclasses.asdict(self.vq.cfg), "t5": t5,
                  "class_names": self.class_names, "lora": lora}
        (out / _CONFIG).write_text(json.dumps(config, indent=2) + "\n")


# ---- building ------------------------------------------------------------------------------------
def from_pretrained(path: str, dtype: torch.dtype = torch.float32) -> LlamaGenPolicy:
    """Load a folder written by :meth:`LlamaGenPolicy.save_pretrained`."""
    from safetensors.torch import load_file

    src = Path(os.path.expanduser(path))
    try:
        config = json.loads((src / _CONFIG).read_text())
        gpt_cfg, vq_cfg = GPTConfig(**config["gpt"]), VQConfig(**config["vq"])
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise UserError(f"model.path: {path} is not a stagerl LlamaGen folder ({err})") from None
    model, vq = LlamaGenGPT(gpt_cfg), VQModel(vq_cfg)
    if config.get("lora"):
        lo = config["lora"]
        add_lora(model, lo["r"], lo["alpha"], 0.0, "|".join(lo["targets"]))
    load_strict(model, load_file(str(src / _GPT)), str(src / _GPT), "model.path")
    load_strict(vq, load_file(str(src / _VQ)), str(src / _VQ), "model.path")
    text = None
    if gpt_cfg.model_type == "t2i":
        t5 = config.get("t5") or ""
        local = src / t5
        text = load_text_encoder(str(local) if t5 and local.exists() else t5,
                                 gpt_cfg.caption_dim, dtype)
        if t5 and local.exists():
            text.source = None  # travels with the folder
    return LlamaGenPolicy(model.to(dtype), vq.to(dtype), text, config.get("class_names"))


def load_official(model_cfg: Any, dtype: torch.dtype, gpt_overrides: dict | None = None,
                  vq_overrides: dict | None = None) -> LlamaGenPolicy:
    """The released ``.pt`` / safetensors GPT (``model.path``) and VQ (``model.vq_path``).

    ``gpt_overrides`` / ``vq_overrides``: architecture fields the official sizes fix (the parity
    test's toy widths); None for real checkpoints."""
    kind, size = model_cfg.llamagen_type, model_cfg.llamagen_size
    if kind not in TYPES:
        raise UserError(f"model.llamagen_type: expected one of {', '.join(TYPES)}, got {kind!r}")
    if size not in SIZES:
        raise UserError(f"model.llamagen_size: expected one of {', '.join(SIZES)}, got {size!r}")
    if model_cfg.image_size not in IMAGE_SIZES and not gpt_overrides:
        raise UserError(f"model.image_size: expected one of {IMAGE_SIZES}, got "
                        f"{model_cfg.image_size}")
    class_names = read_class_names(model_cfg.class_names)
    if not model_cfg.vq_path:
        raise UserError("model.vq_path: LlamaGen needs the VQ tokenizer weights (vq_ds16_c2i.pt "
                        "or vq_ds16_t2i.pt; docs/llamagen.md)")
    gpt_sd = read_state_dict(model_cfg.path, "model.path")
    facts = check_gpt(gpt_sd, model_cfg.path, kind, size)
    vq_sd = read_state_dict(model_cfg.vq_path, "model.vq_path")
    codebook, width = check_vq(vq_sd, model_cfg.vq_path, facts["vocab_size"])
    extra = {k: facts[k] for k in ("num_classes", "caption_dim", "cls_token_num") if k in facts}
    cfg = gpt_config_for(size, kind, model_cfg.image_size, vocab_size=facts["vocab_size"],
                         **extra, **(gpt_overrides or {}))
    with torch.device("meta"):
        model = LlamaGenGPT(cfg)
    model = model.to_empty(device="cpu")  # no random init of weights about to be overwritten
    model.rope.copy_(rope_table(cfg))
    load_strict(model, gpt_sd, model_cfg.path, "model.path")
    del gpt_sd
    vq = VQModel(VQConfig(codebook_size=codebook, codebook_embed_dim=width, **(vq_overrides or {})))
    load_strict(vq, vq_sd, model_cfg.vq_path, "model.vq_path")
    text = None
    if kind == "t2i":
        text = load_text_encoder(model_cfg.t5_path, cfg.caption_dim, dtype)
    return LlamaGenPolicy(model.to(dtype), vq.to(dtype), text, class_names)


def tiny_random(kind: str, grid: int = 8, class_names: list[str] | None = None,
                seed: int = 0) -> LlamaGenPolicy:
    """A tiny randomly initialised LlamaGen for offline tests and smoke runs: 2 blocks of width
    32, a 128-code VQ with three 32-channel levels (8x8 tokens -> 32 px, the shapes world's
    canvas), and for t2i a one-layer random T5 with a byte-level tokenizer (16 caption slots)."""
    if kind not in TYPES:
        raise UserError(f"model.llamagen_type: expected one of {', '.join(TYPES)}, got {kind!r}")
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        cfg = GPTConfig(model_type=kind, dim=32, n_layer=2, n_head=2, multiple_of=32,
                        vocab_size=128, num_classes=max(10, len(class_names or [])),
                        caption_dim=16, cls_token_num=1 if kind == "c2i" else 16, grid=grid)
        model = LlamaGenGPT(cfg)
        nn.init.normal_(model.output.weight, std=0.02)  # a zero head would make every draw uniform
        vq = VQModel(VQConfig(codebook_size=128, codebook_embed_dim=8, ch=32, ch_mult=[1, 1, 1],
                              z_channels=32, num_res_blocks=1))
        text = None
        if kind == "t2i":
            from transformers import T5Config, T5EncoderModel

            from stagerl.policies.janus_tiny import build_tiny_tokenizer

            tok = build_tiny_tokenizer()
            t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32,
                                         num_layers=1, num_heads=2, pad_token_id=tok.pad_token_id))
            text = TextEncoder(t5, tok, None)
    finally:
        torch.random.set_rng_state(gen_state)
    return LlamaGenPolicy(model, vq, text, class_names)


@register_policy("llamagen", recognise=lambda folder: is_stagerl_dir(str(folder)))
def build_llamagen(model_cfg: Any, need_reference: bool) -> PolicyPair:
    """Policy (+ reference) for ``model.kind: llamagen``.

    Full fine-tuning trains the whole GPT (VQ and T5 stay frozen); the reference is a frozen deep
    copy. LoRA: only adapter weights train; the reference is the adapter disabled.
    """
    if model_cfg.dtype not in _DTYPES:
        raise UserError(f"model.dtype: expected one of {', '.join(_DTYPES)}, got {model_cfg.dtype!r}")
    dtype = _DTYPES[model_cfg.dtype]
    if model_cfg.tiny_random:
        policy = tiny_random(model_cfg.llamagen_type,
                             class_names=read_class_names(model_cfg.class_names))
        policy.to(dtype)
    elif is_stagerl_dir(model_cfg.path):
        policy = from_pretrained(model_cfg.path, dtype)
    else:
        policy = load_official(model_cfg, dtype)
    policy.model.gradient_checkpointing = bool(model_cfg.gradient_checkpointing)
    if model_cfg.lora:
        if not policy.is_lora:
            field = getattr(type(model_cfg), "__dataclass_fields__", {}).get("lora_target_modules")
            default = getattr(field, "default", None)  # the schema's default names Janus' modules
            pattern = (LORA_TARGETS if model_cfg.lora_target_modules == default
                       else model_cfg.lora_target_modules)
            try:
                hit = add_lora(policy.model, model_cfg.lora_r, model_cfg.lora_alpha,
                               model_cfg.lora_dropout, pattern)
            except Exception as err:  # re.error
                raise UserError(f"model.lora_target_modules: not a valid regex: {err}") from None
            if not hit:
                raise UserError(f"model.lora_target_modules: {pattern!r} matches no LlamaGen "
                                f"linear layer (names look like 'layers.0.attention.wqkv')")
        else:
            for n, p in policy.model.named_parameters():
                p.requires_grad_("lora_" in n)
        from stagerl.policies.janus_lora import JanusReferenceView

        reference = JanusReferenceView(policy) if need_reference else None
    else:
        if policy.is_lora:  # a LoRA checkpoint trained further in full: fold the adapters in
            _merge_lora(policy.model)
        policy.model.requires_grad_(True)
        reference = _frozen_copy(policy) if need_reference else None
    policy.train()
    log.info("llamagen policy (%s): %d GPT parameters, %d trainable, grid %s, lora=%s",
             policy.cfg.model_type, sum(p.numel() for p in policy.model.parameters()),
             sum(p.numel() for p in policy.parameters() if p.requires_grad), policy.grid,
             model_cfg.lora)
    return PolicyPair(policy=policy, reference=reference)


def _frozen_copy(policy: LlamaGenPolicy) -> LlamaGenPolicy:
    """The reference policy: a frozen copy of the GPT that shares the frozen VQ and T5 (a deep
    copy would duplicate FLAN-T5-XL's encoder, ~1.2 B weights, for nothing)."""
    vq, text = policy.vq, policy._text
    policy.vq, policy._text = None, [None]
    try:
        reference = copy.deepcopy(policy)
    finally:
        policy.vq, policy._text = vq, text
    reference.vq, reference._text = vq, text
    return reference.requires_grad_(False).eval()


def _merge_lora(model: LlamaGenGPT) -> None:
    """Replace every LoRA layer by a plain linear layer holding ``W + (alpha / r) B A``."""
    for name, m in list(model.named_modules()):
        if m in model.lora_modules():
            parent_name, _, child = name.rpartition(".")
            plain = nn.Linear(m.in_features, m.out_features, bias=False,
                              dtype=m.weight.dtype, device=m.weight.device)
            with torch.no_grad():
                plain.weight.copy_(m.merged_weight())
            setattr(model.get_submodule(parent_name), child, plain)


def sized_llamagen(size: str, kind: str, layers: int, image_size: int = 256,
                   dtype: torch.dtype = torch.float32, device: str = "cpu") -> LlamaGenPolicy:
    """A random LlamaGen with the widths of an official size but ``layers`` blocks, the real VQ-16
    architecture and (t2i) a one-layer random T5 of FLAN-T5-XL's width: what ``make gpu-check``
    times and measures (real weights cannot be fetched there). ``size="toy"`` = the tiny model."""
    if size == "toy":
        return tiny_random(kind, grid=4).to(device=device, dtype=dtype)
    cfg = gpt_config_for(size, kind, image_size, n_layer=layers)
    model = LlamaGenGPT(cfg)
    nn.init.normal_(model.output.weight, std=0.02)
    text = None
    if kind == "t2i":
        from transformers import T5Config, T5EncoderModel

        from stagerl.policies.janus_tiny import build_tiny_tokenizer

        tok = build_tiny_tokenizer()
        t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=cfg.caption_dim, d_kv=64,
                                     d_ff=5120, num_layers=1, num_heads=32,
                                     pad_token_id=tok.pad_token_id))
        text = TextEncoder(t5.to(device=device, dtype=dtype), tok, None)
    policy = LlamaGenPolicy(model, VQModel(VQConfig()), text)
    return policy.to(device=device, dtype=dtype)
