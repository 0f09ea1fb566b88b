"""LlamaGen's GPT, written for stagerl: LLaMA-style blocks, 2-D rotary embedding over the token
grid, its conditioning prefix and LoRA (the VQ-16 tokenizer is :mod:`stagerl.policies.llamagen_vq`).

Same computation as FoundationVision/LlamaGen (Sun et al. 2024, "Autoregressive Model Beats
Diffusion", MIT; ``autoregressive/models/gpt.py``), implemented here from its description and
checked against the official modules (tests/test_llamagen_parity.py). Parameter *names* follow
the official checkpoints so that the released ``.pt`` files load as they are (docs/llamagen.md).

The computation, as the official code does it:
- sequence = [condition prefix (``cls_token_num`` slots) ; image tokens in raster order]; the
  prefix is a class embedding (c2i, 1 slot, the extra row ``num_classes`` = "no class") or the
  T5 caption features through a 2-layer tanh-GELU MLP (t2i, left-padded, pads zeroed; the
  unconditional branch uses the learnt ``uncond_embedding`` under the same key mask);
- 2-D RoPE: half of each head's pairs rotate with the row index, half with the column index;
  the prefix positions get an all-zero table, i.e. their queries and keys are *zero* (the
  condition reaches the image only through the values) -- a LlamaGen quirk kept for parity;
- keys of padded prefix slots are masked, every query also sees itself;
- RMSNorm in fp32, SwiGLU MLP with LLaMA's width rule, untied output head, logits in fp32.

Shapes: B rows, S positions, D model width, hd head width, V codebook size, C caption width.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Official GPT widths (autoregressive/models/gpt.py, "GPT Configs"): n_layer, n_head, dim.
SIZES: dict[str, tuple[int, int, int]] = {
    "B": (12, 12, 768), "L": (24, 16, 1024), "XL": (36, 20, 1280), "XXL": (48, 24, 1536),
    "3B": (24, 32, 3200),
}
IMAGE_SIZES = (256, 384, 512)  # with VQ-16: 16x16, 24x24, 32x32 tokens
DOWNSAMPLE = 16


def round_up(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


@dataclass
class GPTConfig:
    """Architecture of :class:`LlamaGenGPT` (stored in stagerl's config.json)."""

    model_type: str = "c2i"  # "c2i" or "t2i"
    dim: int = 1280
    n_layer: int = 36
    n_head: int = 20
    n_kv_head: Optional[int] = None
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    vocab_size: int = 16384
    num_classes: int = 1000  # c2i
    caption_dim: int = 2048  # t2i: T5 feature width
    cls_token_num: int = 1  # prefix slots (c2i 1, t2i 120)
    grid: int = 16  # image tokens per side

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return round_up(hidden, self.multiple_of)


def rope_table(cfg: GPTConfig) -> torch.Tensor:
    """[cls_token_num + grid^2, hd/2, 2] (cos, sin) per position and rotated pair.

    Pair j < hd/4 turns with the row index, pair j >= hd/4 with the column index, both at the
    frequencies base^(-2j / (hd/2)); the prefix rows are zero (see the module docstring).
    """
    half = cfg.head_dim // 2
    inv = 1.0 / (cfg.rope_base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    angle = torch.arange(cfg.grid).float()[:, None] * inv[None, :]  # [g, hd/4]
    rows = angle[:, None, :].expand(cfg.grid, cfg.grid, -1)
    cols = angle[None, :, :].expand(cfg.grid, cfg.grid, -1)
    both = torch.cat([rows, cols], dim=-1).reshape(cfg.grid * cfg.grid, -1)  # [L, hd/2]
    table = torch.stack([both.cos(), both.sin()], dim=-1)
    return torch.cat([torch.zeros(cfg.cls_token_num, table.shape[1], 2), table])


def rotate(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x [B, S, heads, hd], table [S, hd/2, 2] -> x with adjacent pairs rotated (fp32 math)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, S, heads, hd/2, 2]
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]
    a, b = pairs[..., 0], pairs[..., 1]
    out = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1)
    return out.flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_head + 2 * cfg.kv_heads) * hd, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, table: torch.Tensor, mask: torch.Tensor,
                cache: Optional["KVCache"], layer: int) -> torch.Tensor:
        cfg, (b, s, _) = self.cfg, x.shape
        kv = cfg.kv_heads * cfg.head_dim
        q, k, v = self.wqkv(x).split([cfg.dim, kv, kv], dim=-1)
        q = rotate(q.view(b, s, cfg.n_head, -1), table).transpose(1, 2)  # [B, H, S, hd]
        k = rotate(k.view(b, s, cfg.kv_heads, -1), table).transpose(1, 2)
        v = v.view(b, s, cfg.kv_heads, -1).transpose(1, 2)
        if cache is not None:
            k, v = cache.write(layer, k, v)
        if cfg.kv_heads != cfg.n_head:
            k = k.repeat_interleave(cfg.n_head // cfg.kv_heads, dim=1)
            v = v.repeat_interleave(cfg.n_head // cfg.kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(b, s, cfg.dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, table: torch.Tensor, mask: torch.Tensor,
                cache: Optional["KVCache"], layer: int) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), table, mask, cache, layer)
        return h + self.feed_forward(self.ffn_norm(h))


class KVCache:
    """Preallocated keys/values of every layer, [B, kv_heads, S_max, hd] each; ``length`` filled."""

    def __init__(self, cfg: GPTConfig, batch: int, max_len: int, like: torch.Tensor) -> None:
        shape = (batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=like.dtype, device=like.device)
                  for _ in range(cfg.n_layer)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.length = 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class ClassEmbedding(nn.Module):
    """c2i prefix: row ``num_classes`` of the table is the class-dropout ("no class") token."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(cfg.num_classes + 1, cfg.dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:  # [B] -> [B, 1, D]
        return self.embedding_table(labels)[:, None]


class CaptionMLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.caption_dim, cfg.dim, bias=False)
        self.fc2 = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedding(nn.Module):
    """t2i prefix: T5 features [B, T, C] -> [B, T, D]; ``uncond_embedding`` [T, C] is the learnt
    null caption of the unconditional branch (a buffer in the official checkpoints)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cap_proj = CaptionMLP(cfg)
        self.register_buffer("uncond_embedding",
                             torch.randn(cfg.cls_token_num, cfg.caption_dim) / cfg.caption_dim ** 0.5)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.cap_proj(caption)


class LlamaGenGPT(nn.Module):
    """The LlamaGen transformer. ``prefix(...)`` embeds the condition; ``run`` the trunk."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.model_type not in ("c2i", "t2i"):
            raise ValueError(f"model_type must be c2i or t2i, got {cfg.model_type!r}")
        self.cfg = cfg
        self.cls_embedding = ClassEmbedding(cfg) if cfg.model_type == "c2i" else CaptionEmbedding(cfg)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("rope", rope_table(cfg), persistent=False)
        self.gradient_checkpointing = False
        for m in self.modules():  # LlamaGen's N(0, 0.02) init, zero output head
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.output.weight)

    @property
    def prefix_len(self) -> int:
        return self.cfg.cls_token_num

    def prefix(self, cond: torch.Tensor, uncond: bool) -> torch.Tensor:
        """Condition embeddings [B, T, D]. c2i: ``cond`` [B] or [B, 1] class ids (``uncond`` ->
        the dropout row); t2i: ``cond`` [B, T, C] caption features (``uncond`` -> the learnt null
        caption)."""
        if self.cfg.model_type == "c2i":
            labels = cond.reshape(cond.shape[0], -1)[:, 0]
            if uncond:
                labels = torch.full_like(labels, self.cfg.num_classes)
            return self.cls_embedding(labels)
        dtype = self.cls_embedding.cap_proj.fc1.weight.dtype
        caption = cond
        if uncond:
            caption = self.cls_embedding.uncond_embedding[None].expand(cond.shape[0], -1, -1)
        return self.cls_embedding(caption[:, : self.prefix_len].to(dtype))

    def run(self, x: torch.Tensor, key_ok: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Hidden states [B, S, D] (after the final norm) of ``x`` [B, S, D], the positions right
        after the cache's ``length`` (0 without a cache). ``key_ok`` [B, S_all] bool: which keys
        may be attended (False = padded prefix slot)."""
        start = 0 if cache is None else cache.length
        s, s_all = x.shape[1], start + x.shape[1]
        q_pos = torch.arange(start, s_all, device=x.device)
        k_pos = torch.arange(s_all, device=x.device)
        mask = (k_pos[None, :] <= q_pos[:, None]) & key_ok[:, None, :s_all]
        mask = (mask | (k_pos[None, :] == q_pos[:, None]))[:, None]  # [B, 1, S, S_all]
        table = self.rope[start:s_all].to(x.device)
        recompute = self.gradient_checkpointing and cache is None and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if recompute:
                x = checkpoint(layer, x, table, mask, None, i, use_reentrant=False)
            else:
                x = layer(x, table, mask, cache, i)
        if cache is not None:
            cache.length = s_all
        return self.norm(x)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output(hidden).float()

    # ---- LoRA ------------------------------------------------------------------------------------
    def lora_modules(self) -> list["LoRALinear"]:
        return [m for m in self.modules() if isinstance(m, LoRALinear)]

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """The base weights alone (the LoRA reference policy), as peft's context of that name."""
        mods = self.lora_modules()
        for m in mods:
            m.enabled = False
        try:
            yield
        finally:
            for m in mods:
                m.enabled = True


class LoRALinear(nn.Linear):
    """A frozen linear layer plus a trainable low-rank update ``(alpha / r) B A`` (Hu et al. 2021).

    Keeps the base layer's ``weight`` under its own name, so the base keys stay the official ones
    and the adapter adds ``lora_A`` / ``lora_B`` beside them.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", None)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)  # B = 0: the adapter starts as a no-op
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout)
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.enabled:
            y = y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale
        return y

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.scale * (self.lora_B @ self.lora_A)


def add_lora(model: nn.Module, r: int, alpha: float, dropout: float, pattern: str) -> list[str]:
    """Replace every ``nn.Linear`` whose qualified name matches ``pattern`` (``re.fullmatch``)
    by a :class:`LoRALinear`; freeze everything else. Returns the replaced names."""
    regex = re.compile(pattern)
    names = [n for n, m in model.named_modules()
             if type(m) is nn.Linear and regex.fullmatch(n)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout))
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return names


def gpt_config_for(size: str, model_type: str, image_size: int, **kw: object) -> GPTConfig:
    """The official configuration of a named size (t2i: 120 caption slots, FLAN-T5-XL width)."""
    n_layer, n_head, dim = SIZES[size]
    args: dict[str, object] = {"model_type": model_type, "dim": dim, "n_layer": n_layer,
                               "n_head": n_head, "grid": image_size // DOWNSAMPLE}
    if model_type == "t2i":
        args.update(cls_token_num=120, caption_dim=2048)
    args.update(kw)
    return GPTConfig(**args)  # type: ignore[arg-type]


def parameter_count(cfg: GPTConfig) -> int:
    """Weights of the GPT of ``cfg`` (for the memory table in docs/llamagen.md)."""
    d, f = cfg.dim, cfg.ffn_hidden
    per_layer = d * (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim + d * d + 3 * d * f + 2 * d
    prefix = ((cfg.num_classes + 1) * d if cfg.model_type == "c2i"
              else cfg.caption_dim * d + d * d)
    return cfg.n_layer * per_layer + 2 * cfg.vocab_size * d + d + prefix
