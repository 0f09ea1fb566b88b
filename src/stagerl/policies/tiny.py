"""The built-in shapes-world policy: a tiny LlamaGen-style decoder-only transformer.

Design credit: LlamaGen (Sun et al. 2024, "Autoregressive Model Beats Diffusion") -- a plain
decoder-only transformer over VQ image tokens in raster order, the condition as a prefix of the same
sequence, classifier-free guidance learnt by dropping the condition to a null embedding during
training and applied at sampling as ``u + s (c - u)``, and batching the two CFG branches as one
batch of 2N rows. Llama-style pre-RMSNorm blocks with a SwiGLU MLP; learned absolute positions
(enough for a fixed 8x8 grid; LlamaGen uses 2D RoPE).

Sequence layout (fixed, so every row shares positions): ``T`` prompt slots, left-padded with
``<pad>`` (pads are masked out as keys), then the image tokens. The hidden state at slot
``T - 1 + t`` predicts image token ``t``. The unconditional branch is the "null prompt": a single
``<null>`` word, exactly what prompt dropout substitutes during pretraining.

Distributions (policies/base.py): *behaviour* = guided logits / temperature, truncated by top-k /
top-p; *scored* = conditional (``"cond"``) or guided with a detached unconditional branch
(``"cfg"``) logits / temperature, never truncated.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from stagerl.errors import UserError
from stagerl.policies.registry import PolicyPair, register_policy
from stagerl.policies.base import (LOGPROB_MODES, PromptInputs, SampleOutput, SamplingParams,
                                   TokenStats)
from stagerl.policies.sampling import (behaviour_logits, chunked_token_stats, inverse_cdf,
                                       scored_logits)
from stagerl.worlds.shapes.tokenizer import PatchTokenizer

log = logging.getLogger(__name__)

_WEIGHTS, _CONFIG, _VOCAB = "model.safetensors", "config.json", "vocab.json"


# --------------------------------------------------------------------------------------------------
# Prompt vocabulary


class PromptVocab:
    """Word-level prompt vocabulary: lower-cased alphanumeric words, ``<unk>`` for unseen ones."""

    PAD, UNK, NULL = "<pad>", "<unk>", "<null>"

    def __init__(self, words: list[str]) -> None:
        if words[:3] != [self.PAD, self.UNK, self.NULL]:
            raise ValueError("a PromptVocab word list must start with <pad>, <unk>, <null>")
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        self._warned_unknown = False

    @staticmethod
    def split(prompt: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", prompt.lower())

    @classmethod
    def build(cls, prompts: Iterable[str]) -> "PromptVocab":
        """Vocabulary of every word in ``prompts`` (the training prompts), sorted for stability."""
        seen = sorted({w for p in prompts for w in cls.split(p)})
        return cls([cls.PAD, cls.UNK, cls.NULL] + seen)

    def __len__(self) -> int:
        return len(self.words)

    def readable(self, prompt: str) -> bool:
        """Whether the model reads at least one word of ``prompt``; without one the prompt is all
        ``<unk>`` (or nothing) and the model draws an unconditional picture."""
        return any(w in self.index for w in self.split(prompt))

    def known_words(self, limit: int = 40) -> str:
        """The words the model reads, for messages (at most ``limit``)."""
        words = self.words[3:]
        return ", ".join(words[:limit]) + (f" ... ({len(words)} in all)" if len(words) > limit
                                           else "")

    def check_readable(self, prompts: Iterable[tuple[str, str]]) -> None:
        """UserError naming the first ``(where, prompt)`` the model cannot read (see
        :meth:`readable`) and the words it knows; refused like an empty prompt."""
        for where, prompt in prompts:
            if not self.readable(prompt):
                raise UserError(f"{where}: {prompt!r} has no word the shapes model reads, "
                                f"so it would draw an unconditional picture; it knows: "
                                f"{self.known_words()}")

    def encode(self, prompts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids [N, length] and mask [N, length]; long prompts keep their first words."""
        ids = torch.zeros(len(prompts), length, dtype=torch.long)  # <pad> = 0
        mask = torch.zeros(len(prompts), length, dtype=torch.bool)
        unk = self.index[self.UNK]
        self._warn_unknown(prompts)
        for i, prompt in enumerate(prompts):
            words = self.split(prompt)
            if len(words) > length:
                log.warning("prompt has %d words, the model reads %d: %r", len(words), length,
                            prompt)
                words = words[:length]
            if words:
                ids[i, length - len(words):] = torch.tensor([self.index.get(w, unk) for w in words])
                mask[i, length - len(words):] = True
        return ids, mask

    def _warn_unknown(self, prompts: list[str]) -> None:
        """Warn once that words outside the vocabulary are read as ``<unk>`` (the model cannot
        follow such prompts, so samples and rewards for them say little)."""
        if self._warned_unknown:
            return
        unknown = sorted({w for p in prompts for w in self.split(p) if w not in self.index})
        if unknown:
            self._warned_unknown = True
            shown = ", ".join(repr(w) for w in unknown[:8]) + (" ..." if len(unknown) > 8 else "")
            log.warning("prompt words outside the shapes model's vocabulary are read as <unk>: "
                        "%s (shown once; the model knows %d words)", shown, len(self.words) - 3)

    def null(self, n: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional branch: ``<null>`` in the last slot, pads before it."""
        ids = torch.zeros(n, length, dtype=torch.long)
        mask = torch.zeros(n, length, dtype=torch.bool)
        ids[:, -1] = self.index[self.NULL]
        mask[:, -1] = True
        return ids, mask


# --------------------------------------------------------------------------------------------------
# Model


@dataclass
class TinyConfig:
    """Architecture of :class:`TinyPolicy` (saved as config.json next to the weights)."""

    vocab_size: int = 512  # V: image codes (= the tokenizer's codebook size)
    grid: list[int] = field(default_factory=lambda: [8, 8])  # (h, w) image-token grid
    prompt_vocab_size: int = 64  # word vocabulary incl. <pad>, <unk>, <null>
    prompt_len: int = 16  # T: prompt slots (prompts are left-padded to this)
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_hidden: int = 352  # SwiGLU hidden width (~ 8/3 d, Llama's ratio)


class _KVCache:
    """Preallocated keys/values for every layer: [layers, B, heads, S_max, head_dim]."""

    def __init__(self, cfg: TinyConfig, batch: int, max_len: int, like: torch.Tensor) -> None:
        hd = cfg.d_model // cfg.n_heads
        shape = (cfg.n_layers, batch, cfg.n_heads, max_len, hd)
        self.k = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.v = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.length = 0  # filled positions


class _Block(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.norm1 = nn.RMSNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.norm2 = nn.RMSNorm(cfg.d_model)
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor, int] | None) -> torch.Tensor:
        """x [B, S, d]; attn_mask [B, 1, S, S_keys] bool; cache = (k, v, start) of this layer."""
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        if cache is not None:  # write this step's keys/values, then attend over everything so far
            ck, cv, start = cache
            ck[:, :, start:start + s] = k
            cv[:, :, start:start + s] = v
            k, v = ck[:, :, :start + s], cv[:, :, :start + s]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, H, S, hd]
        x = x + self.proj(y.transpose(1, 2).reshape(b, s, d))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class TinyPolicy(nn.Module):
    """Decoder-only transformer over [prompt words | image codes]; a policies.base.Policy."""

    def __init__(self, config: TinyConfig, tokenizer: PatchTokenizer, vocab: PromptVocab) -> None:
        super().__init__()
        if list(tokenizer.grid) != list(config.grid) or tokenizer.vocab_size != config.vocab_size:
            raise ValueError("TinyConfig grid/vocab_size disagree with the tokenizer")
        if len(vocab) != config.prompt_vocab_size:
            raise ValueError("TinyConfig.prompt_vocab_size disagrees with the prompt vocabulary")
        self.config, self.tokenizer, self.vocab = config, tokenizer, vocab
        d = config.d_model
        self.word_emb = nn.Embedding(config.prompt_vocab_size, d)
        self.code_emb = nn.Embedding(config.vocab_size, d)
        self.pos_emb = nn.Parameter(torch.zeros(config.prompt_len + self.num_image_tokens, d))
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, config.vocab_size, bias=False)
        # q_{i,t} lookup table, moved with the module; not a weight (it is the tokenizer's).
        self.register_buffer("code_table", tokenizer.embedding_table(), persistent=False)  # [V, D]
        # GPT-2 / LlamaGen-style N(0, 0.02) initialisation of every matrix (norm gains stay 1).
        for p in self.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=0.02)

    # ---- protocol: shapes ----------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        return int(self.config.grid[0]), int(self.config.grid[1])

    @property
    def num_image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def device(self) -> torch.device:
        return self.pos_emb.device

    # ---- protocol: prompts ---------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> PromptInputs:
        ids, mask = self.vocab.encode(list(prompts), self.config.prompt_len)
        uids, umask = self.vocab.null(len(prompts), self.config.prompt_len)
        dev = self.device
        return PromptInputs(ids.to(dev), mask.to(dev), uids.to(dev), umask.to(dev))

    # ---- core network --------------------------------------------------------------------------
    def _run(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, image_in: torch.Tensor,
             cache: _KVCache | None = None) -> torch.Tensor:
        """Hidden states [B, S, d] of the new positions: the prompt (if the cache is empty) and
        image_in.

        prompt_ids/mask [B, T]; image_in [B, S_img] codes already sampled. With a cache, only the
        positions after ``cache.length`` are computed.
        """
        start = 0 if cache is None else cache.length
        t_len = self.config.prompt_len
        parts = [self.word_emb(prompt_ids)] if start == 0 else []
        parts.append(self.code_emb(image_in))
        x = torch.cat(parts, dim=1)  # [B, S_new, d]
        s_new, s_all = x.shape[1], start + x.shape[1]
        x = x + self.pos_emb[start:s_all]
        key_ok = torch.ones(x.shape[0], s_all, dtype=torch.bool, device=x.device)
        key_ok[:, :t_len] = prompt_mask.bool()
        q_pos = torch.arange(start, s_all, device=x.device)
        k_pos = torch.arange(s_all, device=x.device)
        causal = k_pos[None, :] <= q_pos[:, None]  # [S_new, S_all]
        # Every query also sees itself, so a pad slot's softmax is never over an empty set (NaN).
        mask = (causal & key_ok[:, None, :]) | (k_pos[None, :] == q_pos[:, None])
        mask = mask[:, None]  # [B, 1, S_new, S_all]
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i], start)
            x = block(x, mask, layer_cache)
        if cache is not None:
            cache.length = s_all
        return self.norm(x)

    def image_hidden(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                     tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced final hidden states [N, L, d]; row t predicts image token t."""
        h = self._run(prompt_ids, prompt_mask, tokens[:, :-1])
        return h[:, self.config.prompt_len - 1:]

    def image_logits(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                     tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced next-token logits [N, L, V] (used by pretraining's cross-entropy)."""
        return self.head(self.image_hidden(prompt_ids, prompt_mask, tokens))

    # ---- protocol: teacher-forced statistics ---------------------------------------------------
    def forward(self, inputs: PromptInputs, tokens: torch.Tensor, logprob_mode: str = "cond",
                cfg_scale: float = 1.0, temperature: float = 1.0,
                chunk_size: int = 0) -> TokenStats:
        """Teacher-forced log-probs and entropies of ``tokens`` [N, L], scored distribution."""
        if logprob_mode not in LOGPROB_MODES:
            raise ValueError(f"logprob_mode must be one of {LOGPROB_MODES}, got {logprob_mode!r}")
        h_cond = self.image_hidden(inputs.cond_ids, inputs.cond_mask, tokens)  # [N, L, d]
        h_uncond = None
        if logprob_mode == "cfg" and cfg_scale != 1.0:
            with torch.no_grad():
                h_uncond = self.image_hidden(inputs.uncond_ids, inputs.uncond_mask, tokens)
        mode = "cfg" if h_uncond is not None else "cond"
        logps, ents = chunked_token_stats(self.head, h_cond, h_uncond, tokens, mode, cfg_scale,
                                          temperature, chunk_size)
        return TokenStats(logprobs=logps, entropy=ents)

    # ---- protocol: sampling --------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, inputs: PromptInputs, params: SamplingParams,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None, *,
               use_cache: bool = True) -> SampleOutput:
        """CFG sampling; ``use_cache=False`` recomputes the prefix every step (tests/benchmark)."""
        if params.logprob_mode not in LOGPROB_MODES:
            raise ValueError(f"logprob_mode must be one of {LOGPROB_MODES}")
        n, n_tok, s = len(inputs), self.num_image_tokens, float(params.cfg_scale)
        guided = s != 1.0
        ids, mask = inputs.cond_ids, inputs.cond_mask
        if guided:  # LlamaGen: both branches as one batch of 2N rows
            ids, mask = torch.cat([ids, inputs.uncond_ids]), torch.cat([mask, inputs.uncond_mask])
        dev = ids.device
        tokens = torch.zeros(n, n_tok, dtype=torch.long, device=dev)
        scored = torch.zeros(n, n_tok, device=dev)
        behaviour = torch.zeros(n, n_tok, device=dev)
        entropy = torch.zeros(n, n_tok, device=dev)
        cache = (_KVCache(self.config, ids.shape[0], self.config.prompt_len + n_tok - 1,
                          self.pos_emb) if use_cache else None)
        empty = torch.zeros(ids.shape[0], 0, dtype=torch.long, device=dev)
        h = self._run(ids, mask, empty, cache)[:, -1]
        for t in range(n_tok):
            if t > 0:
                prev = tokens[:, t - 1:t] if use_cache else tokens[:, :t]
                h = self._run(ids, mask, prev.repeat(2 if guided else 1, 1), cache)[:, -1]
            logits = self.head(h).float()  # [B, V]
            c, u_logits = (logits[:n], logits[n:]) if guided else (logits, None)
            lp_scored = torch.log_softmax(
                scored_logits(c, u_logits, params.logprob_mode, s, params.temperature), dim=-1)
            lp_beh = torch.log_softmax(behaviour_logits(c, u_logits, s, params.temperature,
                                                        params.top_k, params.top_p), dim=-1)
            # Inverse-CDF draw: one uniform per row per step, whatever the path (cache or not).
            if noise is not None:
                u = noise[:, t]
            else:
                u = torch.rand(n, generator=generator,
                               device=generator.device if generator is not None else dev)
            tok = inverse_cdf(lp_beh.exp(), u)[:, None]
            tokens[:, t] = tok[:, 0]
            scored[:, t] = lp_scored.gather(-1, tok)[:, 0]
            behaviour[:, t] = lp_beh.gather(-1, tok)[:, 0]
            entropy[:, t] = -(lp_scored.exp() * lp_scored).sum(-1)
        return SampleOutput(tokens=tokens, logprobs=scored, behaviour_logprobs=behaviour,
                            entropy=entropy)

    # ---- protocol: codes and images ------------------------------------------------------------
    def code_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, L] ids -> [N, L, D] L2-normalised codebook vectors (tokenizer.py explains D)."""
        return self.code_table.float()[tokens]

    def decode_array(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, L] ids -> uint8 [N, H, W, 3] (CPU)."""
        return self.tokenizer.decode(tokens.detach().cpu())

    def decode(self, tokens: torch.Tensor) -> list[Image.Image]:
        return [Image.fromarray(a) for a in self.decode_array(tokens).numpy()]

    # ---- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        """Write model.safetensors, config.json, vocab.json and tokenizer.safetensors."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(out / _WEIGHTS), metadata={"format": "stagerl.tiny.v1"})
        (out / _CONFIG).write_text(json.dumps(dataclasses.asdict(self.config), indent=2) + "\n")
        (out / _VOCAB).write_text(json.dumps(self.vocab.words) + "\n")
        self.tokenizer.save(out)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "TinyPolicy":
        """Load a directory written by :meth:`save_pretrained`; UserError if it is not one."""
        src = Path(path)
        missing = [f for f in (_WEIGHTS, _CONFIG, _VOCAB) if not (src / f).is_file()]
        if missing:
            raise UserError(f"model.path {str(src)!r} is not a tiny-policy directory "
                            f"(missing {', '.join(missing)})")
        try:
            config = TinyConfig(**json.loads((src / _CONFIG).read_text()))
            vocab = PromptVocab(json.loads((src / _VOCAB).read_text()))
            model = cls(config, PatchTokenizer.load(src), vocab)
        except (TypeError, ValueError, RuntimeError, KeyError, OSError, SafetensorError) as err:
            raise UserError(f"model.path {str(src)!r}: cannot load the tiny policy ({err})"
                            ) from None
        try:  # the weights file named on its own: garbage, truncated or another model's weights
            model.load_state_dict(load_file(str(src / _WEIGHTS)))
        except (ValueError, RuntimeError, OSError, SafetensorError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"{src / _WEIGHTS}: cannot load these weights ({first})") from None
        return model


# --------------------------------------------------------------------------------------------------
# Registry entry


def shipped_model_dir() -> Path:
    """Directory of the shipped shapes-world model (package data: stagerl/assets/shapes)."""
    return Path(__file__).resolve().parent.parent / "assets" / "shapes"


def resolve_model_path(path: str) -> Path:
    """``builtin:shapes`` -> the shipped model dir; anything else is a local directory."""
    if path == "builtin:shapes":
        return shipped_model_dir()
    if path.startswith("builtin:"):
        raise UserError(f"model.path: unknown built-in model {path!r} (known: builtin:shapes)")
    return Path(path).expanduser()


def prompt_vocab(model_cfg: Any) -> PromptVocab | None:
    """The prompt vocabulary of ``model.kind: tiny``'s ``model.path`` (read from its vocab.json,
    no weights loaded); None for another kind or a folder without one (its load reports that)."""
    if getattr(model_cfg, "kind", "tiny") != "tiny":
        return None
    path = resolve_model_path(str(model_cfg.path)) / _VOCAB
    try:
        return PromptVocab(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def located_prompts(path: str | Path) -> list[tuple[str, str]]:
    """``(where, prompt)`` for every prompt of a prompt file or folder, ``where`` being
    ``file:line`` (or ``file: item k`` in a .json array), in the order data.load_prompts reads."""
    from stagerl.data import PROMPT_SUFFIXES, load_prompt_file

    src = Path(path)
    if src.is_dir():
        return [pair for f in sorted(src.iterdir()) if f.suffix.lower() in PROMPT_SUFFIXES
                for pair in located_prompts(f)]
    items = load_prompt_file(src)  # malformed files fail here, as they do in training
    text = src.read_text(encoding="utf-8")
    lines, suffix = text.splitlines(), src.suffix.lower()
    if suffix == ".json" and text.lstrip().startswith("["):
        return [(f"{src}: item {k}", it.prompt) for k, it in enumerate(items, start=1)]
    if suffix == ".csv":  # header on line 1, one row a line (no quoted line breaks assumed)
        numbers = [i for i, line in enumerate(lines, start=1) if i > 1 and line.strip()]
    else:  # .txt, .jsonl: one prompt a non-blank line
        numbers = [i for i, line in enumerate(lines, start=1) if line.strip()]
    if len(numbers) != len(items):  # e.g. CSV rows with an empty prompt cell: count items
        return [(f"{src}: prompt {k}", it.prompt) for k, it in enumerate(items, start=1)]
    return [(f"{src}:{i}", it.prompt) for i, it in zip(numbers, items)]


def is_tiny_dir(path: Path) -> bool:
    """A shapes-model folder written by :meth:`TinyPolicy.save_pretrained` (its vocab.json and
    config.json; the weights are checked when it loads)."""
    return (path / _VOCAB).is_file() and (path / _CONFIG).is_file()


@register_policy("tiny", recognise=is_tiny_dir)
def build_tiny(model_cfg: Any, need_reference: bool) -> PolicyPair:
    """Load the tiny policy from ``model_cfg.path``; the reference is a frozen deep copy."""
    if getattr(model_cfg, "lora", False):
        raise UserError("model.lora: LoRA adapters are supported for model.kind 'janus' only; the "
                        "tiny policy trains all of its ~1M weights")
    directory = resolve_model_path(str(model_cfg.path))
    if not directory.is_dir():
        raise UserError(f"model.path {str(directory)!r} does not exist or is not a directory")
    policy = TinyPolicy.from_pretrained(directory)
    policy.to(getattr(torch, str(getattr(model_cfg, "dtype", "float32"))))
    reference = None
    if need_reference:
        reference = copy.deepcopy(policy).eval()
        reference.requires_grad_(False)
    return PolicyPair(policy=policy.train(), reference=reference)
