"""Numerical parity of stagerl's LlamaGen with the official implementation.

tests/fixtures/llamagen_parity.safetensors holds toy-size weights (fp16-exact values) and what
the official modules computed from them (its metadata names the official commit; the numbers were
produced outside this repository by running FoundationVision/LlamaGen's ``gpt.py``, ``generate.py``
and ``vq_model.py``). Here the same weights go through stagerl's checkpoint loader, as official
``.pt`` files, and must give:
- teacher-forced logits of both CFG branches within 1e-5 (fp32), c2i and t2i;
- the tokens of ``generate()`` under CFG from the same seed (the same multinomial draws);
- decoded pixels within 1e-5; the encoder's codes equal.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from stagerl.policies.base import PromptInputs, SamplingParams
from stagerl.policies.llamagen import load_official
from stagerl.policies.llamagen_model import SIZES

FIXTURE = Path(__file__).parent / "fixtures" / "llamagen_parity.safetensors"
DATA = load_file(str(FIXTURE))
with safe_open(str(FIXTURE), "pt") as fh:
    META = fh.metadata()
GPT = json.loads(META["gpt"])
VQ = json.loads(META["vq"])
_REFERENCE = ("logits", "sample", "labels", "caption", "mask", "pixels", "image", "codes")


def _weights(prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in DATA.items():
        if k.startswith(prefix) and not k[len(prefix):].startswith(_REFERENCE):
            out[k[len(prefix):]] = v.float()
    return out


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Both toy models, loaded from official-format .pt files through the loader."""
    root = tmp_path_factory.mktemp("llamagen_official")
    vq = _weights("vq.")
    vq["quantize.codebook_used"] = torch.zeros(65536)  # the official files carry this counter
    torch.save({"model": vq}, root / "vq.pt")
    out = {}
    SIZES["_toy"] = (GPT["n_layer"], GPT["n_head"], GPT["dim"])
    try:
        for kind in ("c2i", "t2i"):
            gpt = _weights(f"{kind}.")
            gpt["freqs_cis"] = torch.zeros(3, 2)  # a computed table older official files carry
            torch.save({"model": gpt}, root / f"{kind}.pt")
            cfg = SimpleNamespace(llamagen_type=kind, llamagen_size="_toy", image_size=64,
                                  path=str(root / f"{kind}.pt"), vq_path=str(root / "vq.pt"),
                                  t5_path="", class_names="")
            overrides = {"multiple_of": GPT["multiple_of"], "grid": GPT["grid"]}
            vq_over = {k: VQ[k] for k in ("ch", "ch_mult", "z_channels", "num_res_blocks")}
            if kind == "t2i":  # no T5 here: the fixture holds the caption features themselves
                import stagerl.policies.llamagen as lg

                real, lg.load_text_encoder = lg.load_text_encoder, lambda *a, **k: object()
                try:
                    out[kind] = load_official(cfg, torch.float32, overrides, vq_over).eval()
                finally:
                    lg.load_text_encoder = real
            else:
                out[kind] = load_official(cfg, torch.float32, overrides, vq_over).eval()
    finally:
        del SIZES["_toy"]
    return out


def _inputs(kind: str) -> PromptInputs:
    if kind == "c2i":
        ids = DATA["c2i.labels"][:, None]
        ones = torch.ones_like(ids)
        return PromptInputs(ids, ones, torch.full_like(ids, GPT["num_classes"]), ones.clone())
    mask = DATA["t2i.mask"].long()
    return PromptInputs(torch.zeros_like(mask), mask, torch.zeros_like(mask), mask.clone(),
                        {"caption": DATA["t2i.caption"]})


def test_fixture_names_the_official_commit():
    assert len(META["official_commit"]) == 40 and META["repository"].endswith("LlamaGen")


@pytest.mark.parametrize("kind", ["c2i", "t2i"])
@pytest.mark.parametrize("branch", ["cond", "uncond"])
def test_teacher_forced_logits_match_official(policies, kind, branch):
    with torch.no_grad():
        logits = policies[kind].image_logits(_inputs(kind), DATA["tokens"], uncond=branch == "uncond")
    ref = DATA[f"{kind}.logits_{branch}"]
    assert logits.shape == ref.shape
    assert (logits - ref).abs().max().item() <= 1e-5
    assert ref.std() > 0.1  # the reference is not a degenerate (zero-head) model


@pytest.mark.parametrize("kind,seed,cfg_scale,temperature",
                         [("c2i", 11, 4.0, 1.0), ("c2i", 12, 1.0, 0.8), ("t2i", 21, 4.0, 1.0)])
def test_cfg_sampling_draws_the_official_tokens(policies, kind, seed, cfg_scale, temperature):
    params = SamplingParams(cfg_scale=cfg_scale, temperature=temperature, top_k=0, top_p=1.0)
    gen = torch.Generator().manual_seed(seed)  # generate() draws from the global generator
    out = policies[kind].sample(_inputs(kind), params, generator=gen)
    ref = DATA[f"{kind}.sample_s{seed}"]
    assert torch.equal(out.tokens, ref)
    # and the recorded log-probs are the teacher-forced ones of those tokens
    stats = policies[kind](_inputs(kind), out.tokens, cfg_scale=cfg_scale, temperature=temperature)
    assert torch.allclose(stats.logprobs, out.logprobs, atol=1e-5)


def test_decoded_pixels_and_codes_match_official(policies):
    pixels = policies["c2i"].decode_pixels(DATA["tokens"])
    ref = DATA["vq.pixels"]
    assert pixels.shape == ref.shape and (pixels - ref).abs().max().item() <= 1e-5
    assert torch.equal(policies["c2i"].encode_images(DATA["vq.image"]), DATA["vq.codes"])
    images = policies["c2i"].decode(DATA["tokens"])
    assert images[0].size == (ref.shape[-1], ref.shape[-2])
