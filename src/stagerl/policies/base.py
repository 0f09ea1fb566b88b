"""The narrow adapter every policy sits behind (docs/design.md §6).

The trainer never reaches into a model's submodules: it only calls what is declared here. Both the
built-in shapes-world model (`policies/tiny.py`) and Janus-Pro (`policies/janus.py`) implement it.

Shapes: N = number of sequences in the batch (prompts x group size), L = h * w image tokens,
V = image-token vocabulary size, D = code-embedding dimension.

Distributions (docs/algorithm.md, "Behaviour vs scored distribution"):
- *behaviour*: what sampling draws from: CFG-guided logits ``u + s (c - u)``, divided by the
  temperature, then truncated by top-k / top-p.
- *scored*: what the loss, KL and entropy use, chosen by ``logprob_mode``:
  ``"cond"`` = conditional logits only; ``"cfg"`` = guided logits with the unconditional branch
  detached. Both are divided by the temperature and never truncated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from PIL import Image

LOGPROB_MODES = ("cond", "cfg")


@dataclass
class PromptInputs:
    """Tokenised prompts for one batch, conditional and unconditional branch.

    Each adapter fills the tensors it needs; the trainer only moves it between devices and indexes
    rows (``select``). ``extra`` holds adapter-specific tensors with a leading N dimension.
    """

    cond_ids: torch.Tensor  # [N, T] int64 prompt token ids (left-padded where lengths differ)
    cond_mask: torch.Tensor  # [N, T] bool/int attention mask, 1 = real token
    uncond_ids: torch.Tensor  # [N, T] int64 unconditional-branch ids (same layout as cond_ids)
    uncond_mask: torch.Tensor  # [N, T] attention mask of the unconditional branch
    extra: dict[str, torch.Tensor] | None = None

    def to(self, device: torch.device | str) -> "PromptInputs":
        extra = None if self.extra is None else {k: v.to(device) for k, v in self.extra.items()}
        return PromptInputs(self.cond_ids.to(device), self.cond_mask.to(device),
                            self.uncond_ids.to(device), self.uncond_mask.to(device), extra)

    def select(self, index: torch.Tensor | slice) -> "PromptInputs":
        extra = None if self.extra is None else {k: v[index] for k, v in self.extra.items()}
        return PromptInputs(self.cond_ids[index], self.cond_mask[index],
                            self.uncond_ids[index], self.uncond_mask[index], extra)

    def __len__(self) -> int:
        return int(self.cond_ids.shape[0])


@dataclass
class SamplingParams:
    """How to sample image tokens (mirrors config section ``sampling``)."""

    cfg_scale: float = 3.0  # s in  u + s (c - u); 1.0 = no guidance
    temperature: float = 1.0
    top_k: int = 0  # 0 = off (full vocabulary)
    top_p: float = 1.0  # 1.0 = off
    logprob_mode: str = "cond"  # which distribution `SampleOutput.logprobs` is recorded under
    cache: str = "dynamic"  # KV cache of adapters that offer a choice: "dynamic" or "static"
    compile: bool = False  # torch.compile the decode step (adapters that support it)

    @classmethod
    def from_config(cls, sampling: Any, cfg_scale: float | None = None) -> "SamplingParams":
        """The settings of config section ``sampling``; ``cfg_scale`` overrides its scale. Every
        caller (rollout, in-run evaluation, ``stagerl eval``/``sample``) builds them here, so none
        drops a field."""
        return cls(sampling.cfg_scale if cfg_scale is None else cfg_scale, sampling.temperature,
                   sampling.top_k, sampling.top_p, sampling.logprob_mode, sampling.cache,
                   sampling.compile)


@dataclass
class SampleOutput:
    """Result of CFG sampling with a KV cache."""

    tokens: torch.Tensor  # [N, L] int64 sampled image-token ids
    logprobs: torch.Tensor  # [N, L] fp32 log-prob of each token under the *scored* distribution
    behaviour_logprobs: torch.Tensor  # [N, L] fp32 log-prob under the *behaviour* distribution
    entropy: torch.Tensor  # [N, L] fp32 entropy of the full *scored* distribution at each step


class TokenStats(NamedTuple):
    """Teacher-forced statistics of given tokens under the scored distribution.

    A named tuple, not a dataclass: engines that hook the module's outputs (DeepSpeed ZeRO-3's
    backward hooks) only see tensors inside tuples, lists and dicts.
    """

    logprobs: torch.Tensor  # [N, L] fp32 log pi(x_t | c, x_<t)  (carries grad when requested)
    entropy: torch.Tensor  # [N, L] fp32 entropy of the full next-token distribution


@runtime_checkable
class Policy(Protocol):
    """What the trainer needs from a model. Implementations are ``torch.nn.Module`` subclasses.

    ``forward`` is the teacher-forced computation, so that DDP/FSDP wrap and synchronise it
    (docs/development.md, "Multi-process on CPU": gradients are synced only for computation that
    runs through the wrapped forward).
    """

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the image-token grid; L = h * w."""

    @property
    def num_image_tokens(self) -> int:
        """L."""

    def encode_prompts(self, prompts: list[str]) -> PromptInputs:
        """Tokenise prompts (and build the unconditional branch the way the model was trained)."""

    def sample(self, inputs: PromptInputs, params: SamplingParams,
               generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None) -> SampleOutput:
        """CFG sampling with a KV cache, no gradients. One sequence per row of ``inputs``.

        Randomness comes from ``noise`` [N, L] (uniforms; token = inverse CDF, see
        :mod:`stagerl.policies.sampling`) when given, else from ``generator``.
        """

    def forward(self, inputs: PromptInputs, tokens: torch.Tensor, logprob_mode: str = "cond",
                cfg_scale: float = 1.0, temperature: float = 1.0,
                chunk_size: int = 0) -> TokenStats:
        """Teacher-forced log-probs and entropies of ``tokens`` [N, L].

        ``chunk_size`` > 0 computes the head/log-softmax over that many positions at a time so that
        an [N, L, V] fp32 tensor is never materialised at once.
        """

    def code_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, L] ids -> [N, L, D] L2-normalised VQ codebook vectors q_{i,t} (docs/algorithm.md §4)."""

    def decode(self, tokens: torch.Tensor) -> list[Image.Image]:
        """[N, L] ids -> N RGB PIL images."""

    def save_pretrained(self, path: str) -> None:
        """Write weights (safetensors) and whatever is needed to load them back."""
