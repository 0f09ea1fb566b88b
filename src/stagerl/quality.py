"""Quality and drift measures on the shapes world that the training reward does not see.

The strict reward is one bit per image. These measures look at *how* an image is made and at how
far the policy has moved, so they can show drift that a rising reward hides:

- **cleanliness** (exact detector, worlds/shapes/detect.py):
  - ``fragments_per_image``: components that are not clean shapes (the strict reward fails an image
    with any, but does not count them, so a policy can get dirtier on images it already fails);
  - ``speckle_px_per_image``: pixels in tiny components the detector ignores
    (< min_fragment_pixels); the reward never sees them at all;
  - ``clean_pixel_frac``: of the non-background pixels, the fraction that belongs to well-formed
    shapes (mean over non-empty images);
  - ``empty_image_frac``: images with nothing but background.
- **token drift**: Jensen-Shannon divergence (bits, in [0, 1]) between the code-usage histogram of
  generated images and that of the pretraining data (tokenizer-encoded ground-truth renders of the
  "train" split), plus the fraction of the codebook used. A finite sample has a JSD above 0 even
  from the same distribution; :func:`pretraining_code_histogram` also gives that floor.
- **within-prompt diversity** (:func:`within_prompt_diversity`): of the k images of one prompt,
  the mean pairwise code (token) distance and the fraction of distinct images, averaged over
  prompts; both 0 for a policy that draws one image per prompt (mode collapse), which the other
  measures, all pooled over prompts, cannot see.
- **KL to the base model**: per-token k3 (Schulman's estimator, docs/algorithm.md §6) of the policy's own
  samples, teacher-forced under the policy and the frozen base model (conditional logits, the
  distribution the training KL uses), plus both models' mean entropies on those samples.

Generated images decode by codebook lookup and the codebook's patches are distinct, so encoding an
image recovers its tokens exactly; every measure here can run from the saved PNGs.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from stagerl.errors import UserError
from stagerl.policies.base import Policy
from stagerl.worlds.shapes.detect import parse_image, snap_colors
from stagerl.worlds.shapes.spec import WorldSpec

log = logging.getLogger(__name__)

_REF_CACHE: dict[tuple[str, int, int, str], tuple[torch.Tensor, float]] = {}


def _arrays(images: Sequence[Image.Image | np.ndarray]) -> np.ndarray:
    """PIL images or arrays -> uint8 [N, H, W, 3]."""
    return np.stack([np.asarray(im.convert("RGB")) if isinstance(im, Image.Image)
                     else np.asarray(im, dtype=np.uint8) for im in images])


# --------------------------------------------------------------------------------------------------
# Cleanliness


def cleanliness(images: Sequence[Image.Image | np.ndarray],
                spec: WorldSpec = WorldSpec()) -> dict[str, float]:
    """Mean fragments, speckle pixels, clean-pixel fraction and empty-image fraction per image."""
    if len(images) == 0:
        raise ValueError("cleanliness: no images")
    frags, speckle, clean_frac, empty, off = [], [], [], 0, []
    for arr in _arrays(images):
        classes = snap_colors(arr, spec)  # [H, W]: 0 background, K+1 off-palette
        parse = parse_image(arr, spec)
        fg = int((classes != 0).sum())
        frag_px = sum(f.pixels for f in parse.fragments)
        frags.append(len(parse.fragments))
        speckle.append(parse.speckle_pixels)
        off.append(float((classes == len(spec.colors) + 1).mean()))
        if fg == 0:
            empty += 1
        else:
            clean_frac.append((fg - frag_px - parse.speckle_pixels) / fg)
    return {
        "fragments_per_image": float(np.mean(frags)),
        "speckle_px_per_image": float(np.mean(speckle)),
        "clean_pixel_frac": float(np.mean(clean_frac)) if clean_frac else float("nan"),
        "empty_image_frac": empty / len(frags),
        "offpalette_px_frac": float(np.mean(off)),
    }


# --------------------------------------------------------------------------------------------------
# Token drift


def code_histogram(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Normalised code-usage histogram [V] of tokens [N, L]."""
    counts = torch.bincount(tokens.reshape(-1).long().cpu(), minlength=vocab_size).double()
    return counts / counts.sum().clamp_min(1.0)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence in bits between two histograms [V] (0 = equal, 1 = disjoint)."""
    p = p.double() / p.sum()
    q = q.double() / q.sum()
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor) -> torch.Tensor:
        nz = a > 0
        return (a[nz] * (a[nz] / m[nz]).log2()).sum()

    return float(0.5 * kl(p) + 0.5 * kl(q))


def _tokenizer_of(policy: Policy) -> Any:
    tok = getattr(policy, "tokenizer", None)
    if tok is None or not hasattr(tok, "encode"):
        raise UserError("quality measures need the shapes-world tiny policy (a patch tokenizer)")
    return tok


def encode_images(policy: Policy, images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
    """Image tokens [N, L] of decoded images (exact for codebook-lookup images)."""
    return _tokenizer_of(policy).encode(_arrays(images))


def pretraining_code_histogram(policy: Policy, n_examples: int = 2000, seed: int = 0,
                               n_floor: int = 0) -> tuple[torch.Tensor, float]:
    """(histogram [V] of the tokenizer-encoded ground-truth renders of ``n_examples`` "train"
    prompts, the JSD floor): the floor is the JSD of ``n_floor`` ground-truth "test" renders against
    that histogram, i.e. what a perfect model scores at that sample size (0 when n_floor = 0).
    Cached per (codebook, n, seed, n_floor)."""
    from stagerl.worlds.shapes.prompts import generate

    tok = _tokenizer_of(policy)
    key = (hashlib.sha256(tok.codebook.numpy().tobytes()).hexdigest(), n_examples, seed,
           str(n_floor))
    if key not in _REF_CACHE:
        spec = _spec_for(tok)
        train = np.stack([ex.image(spec) for ex in generate(n_examples, seed, spec, "train")])
        hist = code_histogram(tok.encode(train), tok.vocab_size)
        floor = 0.0
        if n_floor:
            test = np.stack([ex.image(spec) for ex in generate(n_floor, seed + 1, spec, "test")])
            floor = js_divergence(code_histogram(tok.encode(test), tok.vocab_size), hist)
        _REF_CACHE[key] = (hist, floor)
    return _REF_CACHE[key]


def _spec_for(tokenizer: Any) -> WorldSpec:
    """The world whose canvas the tokenizer reads (default spec otherwise)."""
    canvas = int(tokenizer.canvas[0])
    return WorldSpec() if canvas == WorldSpec().canvas else WorldSpec(canvas=canvas)


def token_drift(policy: Policy, images: Sequence[Image.Image | np.ndarray],
                reference_hist: torch.Tensor) -> dict[str, float]:
    """JSD of the images' code histogram to the pretraining data's, and codebook usage."""
    tok = _tokenizer_of(policy)
    tokens = encode_images(policy, images)
    hist = code_histogram(tokens, tok.vocab_size)
    return {"code_jsd": js_divergence(hist, reference_hist),
            "codes_used_frac": float((hist > 0).double().mean())}


# --------------------------------------------------------------------------------------------------
# Within-prompt diversity


def _groups(tokens: torch.Tensor, group_size: int) -> torch.Tensor:
    """tokens [N, L], group-major -> [P, k, L]; k >= 2 images per prompt."""
    if tokens.dim() != 2:
        raise ValueError(f"within-prompt diversity: tokens must be [N, L], "
                         f"got {tuple(tokens.shape)}")
    n = int(tokens.shape[0])
    if group_size < 2 or n == 0 or n % group_size:
        raise ValueError(f"within-prompt diversity: {n} token rows are not groups of "
                         f"{group_size} >= 2 images per prompt")
    return tokens.reshape(n // group_size, group_size, -1)


def pairwise_code_distance(tokens: torch.Tensor, group_size: int) -> float:
    """Mean pairwise code distance within prompts, in [0, 1].

    ``tokens`` [N, L] hold N = P * k images' codes, group-major (rows ``p*k .. p*k + k - 1`` are
    prompt p's). For one prompt: the mean over its k(k-1)/2 unordered image pairs (i, j) of the
    normalised Hamming distance ``#{t : tokens_i[t] != tokens_j[t]} / L``. Returned: the mean of
    that over the P prompts. 0 when every prompt's images are identical (mode collapse); 1 when
    every pair differs at every position. Cost O(P k^2 L), no [k, k, L] tensor.
    """
    g = _groups(tokens, group_size)
    k = g.shape[1]
    total = torch.zeros(g.shape[0], dtype=torch.float64, device=g.device)
    for i in range(k - 1):
        total += (g[:, i:i + 1] != g[:, i + 1:]).double().mean(-1).sum(-1)  # [P]
    return float((total / (k * (k - 1) / 2)).mean())


def distinct_image_frac(tokens: torch.Tensor, group_size: int) -> float:
    """Fraction of distinct images within prompts, in [0, 1].

    For one prompt with k images (``tokens`` as in :func:`pairwise_code_distance`), d of them
    distinct (equal codes = the same image): ``(d - 1) / (k - 1)``, i.e. 0 when all k are one image
    and 1 when no two are equal. Returned: the mean over prompts.
    """
    g = _groups(tokens, group_size)
    k = g.shape[1]
    distinct = [int(torch.unique(grp, dim=0).shape[0]) for grp in g]
    return float(np.mean([(d - 1) / (k - 1) for d in distinct]))


def within_prompt_diversity(tokens: torch.Tensor, group_size: int) -> dict[str, float]:
    """{"code_distance": :func:`pairwise_code_distance`, "distinct_frac":
    :func:`distinct_image_frac`} of ``tokens`` [N, L] in groups of ``group_size`` per prompt."""
    return {"code_distance": pairwise_code_distance(tokens, group_size),
            "distinct_frac": distinct_image_frac(tokens, group_size)}


# --------------------------------------------------------------------------------------------------
# KL to the base model


@torch.no_grad()
def kl_to_base(policy: Policy, base: Policy, prompts: list[str], tokens: torch.Tensor,
               batch: int = 256) -> dict[str, float]:
    """Per-token k3 KL(policy || base) on ``tokens`` [N, L] (the policy's own samples),
    teacher-forced under both models' conditional logits; plus mean k1 and both mean entropies."""
    if len(prompts) != len(tokens):
        raise ValueError(f"{len(prompts)} prompts but {len(tokens)} token rows")
    sums = {"kl_k3": 0.0, "kl_k1": 0.0, "entropy": 0.0, "base_entropy": 0.0}
    total = 0
    modes = [(m, m.training) for m in (policy, base)]
    for m, _ in modes:
        m.eval()
    device = next(policy.parameters()).device
    for s in range(0, len(prompts), batch):
        p, t = prompts[s:s + batch], tokens[s:s + batch].to(device)
        sp = policy(policy.encode_prompts(p).to(device), t, logprob_mode="cond")
        sb = base(base.encode_prompts(p).to(device), t, logprob_mode="cond")
        d = sb.logprobs.float() - sp.logprobs.float()  # [n, L] log ref - log pi
        sums["kl_k3"] += float((d.exp() - d - 1.0).sum())
        sums["kl_k1"] += float((-d).sum())
        sums["entropy"] += float(sp.entropy.float().sum())
        sums["base_entropy"] += float(sb.entropy.float().sum())
        total += d.numel()
    for m, was in modes:
        m.train(was)
    return {k: v / max(1, total) for k, v in sums.items()}


# --------------------------------------------------------------------------------------------------
# Everything at once


def quality_measures(policy: Policy, base: Policy | None, prompts: list[str],
                     images: Sequence[Image.Image], reference_hist: torch.Tensor,
                     spec: WorldSpec = WorldSpec(), group_size: int = 1) -> dict[str, float]:
    """Cleanliness + token drift + (with ``base``) KL to the base model; N images of N prompts.

    With ``group_size`` k >= 2 (the images come k per prompt, group-major) it adds the
    within-prompt diversity as ``diversity_code_distance`` and ``diversity_distinct_frac``."""
    out = cleanliness(images, spec)
    out.update(token_drift(policy, images, reference_hist))
    tokens = None
    if base is not None:
        tokens = encode_images(policy, images)
        out.update(kl_to_base(policy, base, prompts, tokens))
    if group_size >= 2:
        tokens = encode_images(policy, images) if tokens is None else tokens
        out.update({f"diversity_{k}": v
                    for k, v in within_prompt_diversity(tokens, group_size).items()})
    return out
