"""The tiny policy behind the Policy protocol."""

from __future__ import annotations

import types

import pytest
import torch

from stagerl.errors import UserError
from stagerl.policies import Policy, SamplingParams, build_policy
from stagerl.policies.tiny import PromptVocab, TinyConfig, TinyPolicy
from stagerl.worlds.shapes.tokenizer import PatchTokenizer

PROMPTS = ["a photo of a red circle", "two blue squares", "a green triangle left of a circle"]


def make_policy(seed: int = 0, grid: int = 4, codes: int = 24) -> TinyPolicy:
    """A small random-init policy (4x4 grid of 4x4-pixel patches, 24 random codes)."""
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randint(0, 256, (codes, 4, 4, 3), generator=g, dtype=torch.uint8)
    tok = PatchTokenizer(codebook, (4 * grid, 4 * grid), 4)
    vocab = PromptVocab.build(PROMPTS)
    cfg = TinyConfig(vocab_size=codes, grid=[grid, grid], prompt_vocab_size=len(vocab),
                     prompt_len=8, d_model=32, n_layers=2, n_heads=2, mlp_hidden=64)
    torch.manual_seed(seed)
    model = TinyPolicy(cfg, tok, vocab)
    with torch.no_grad():  # larger weights than N(0, .02) so distributions are far from uniform
        for p in model.parameters():
            p.mul_(10.0 if p.ndim == 2 else 1.0)
    return model.eval()


@pytest.fixture(scope="module")
def policy() -> TinyPolicy:
    return make_policy()


def test_protocol_and_shapes(policy: TinyPolicy) -> None:
    assert isinstance(policy, Policy)
    assert policy.grid == (4, 4) and policy.num_image_tokens == 16
    inputs = policy.encode_prompts(PROMPTS)
    assert inputs.cond_ids.shape == (3, 8) and inputs.uncond_ids.shape == (3, 8)
    # left padding: last slot is a real word; the null prompt is a single <null>
    assert inputs.cond_mask[:, -1].all() and inputs.uncond_mask.sum(1).tolist() == [1, 1, 1]
    unk = policy.encode_prompts(["zebra circle"]).cond_ids[0, -2:]
    assert unk[0].item() == policy.vocab.index["<unk>"] and unk[1].item() != unk[0].item()
    out = policy.sample(inputs, SamplingParams(cfg_scale=2.0), torch.Generator().manual_seed(0))
    assert out.tokens.shape == (3, 16) and out.tokens.dtype == torch.long
    assert out.tokens.min() >= 0 and out.tokens.max() < policy.config.vocab_size
    emb = policy.code_embeddings(out.tokens)
    assert emb.shape == (3, 16, policy.tokenizer.embed_dim)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3, 16), atol=1e-5)
    images = policy.decode(out.tokens)
    assert len(images) == 3 and images[0].size == (16, 16) and images[0].mode == "RGB"


@pytest.mark.parametrize("mode", ["cond", "cfg"])
@pytest.mark.parametrize("cfg_scale,temperature,top_k,top_p",
                         [(1.0, 1.0, 0, 1.0), (3.0, 1.0, 0, 1.0), (2.5, 0.7, 5, 0.9)])
@pytest.mark.parametrize("chunk", [0, 5])
def test_sampling_logprobs_match_teacher_forcing(policy: TinyPolicy, mode: str, cfg_scale: float,
                                                 temperature: float, top_k: int, top_p: float,
                                                 chunk: int) -> None:
    inputs = policy.encode_prompts(PROMPTS)
    params = SamplingParams(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                            top_p=top_p, logprob_mode=mode)
    out = policy.sample(inputs, params, torch.Generator().manual_seed(1))
    stats = policy(inputs, out.tokens, logprob_mode=mode, cfg_scale=cfg_scale,
                   temperature=temperature, chunk_size=chunk)
    assert (stats.logprobs - out.logprobs).abs().max().item() <= 1e-4
    assert (out.behaviour_logprobs <= 1e-6).all()
    if top_k == 0 and top_p == 1.0 and (mode == "cfg" or cfg_scale == 1.0):
        # untruncated and scored == behaviour: the two records must coincide
        assert torch.allclose(out.logprobs, out.behaviour_logprobs, atol=1e-5)
    if top_k:  # truncation renormalises, so the behaviour log-prob is >= the untruncated guided one
        guided = policy(inputs, out.tokens, "cfg", cfg_scale, temperature).logprobs
        assert (out.behaviour_logprobs >= guided - 1e-5).all()


def test_modes_differ_under_guidance(policy: TinyPolicy) -> None:
    inputs = policy.encode_prompts(PROMPTS)
    tokens = policy.sample(inputs, SamplingParams(cfg_scale=3.0),
                           torch.Generator().manual_seed(2)).tokens
    cond = policy(inputs, tokens, "cond", 3.0).logprobs
    cfg = policy(inputs, tokens, "cfg", 3.0).logprobs
    assert (cond - cfg).abs().max() > 1e-2


def test_entropy_matches_direct_computation(policy: TinyPolicy) -> None:
    inputs = policy.encode_prompts(PROMPTS)
    tokens = torch.randint(0, policy.config.vocab_size, (3, 16),
                           generator=torch.Generator().manual_seed(3))
    for mode, s, temp in [("cond", 1.0, 1.0), ("cfg", 2.0, 0.8)]:
        stats = policy(inputs, tokens, mode, s, temp)
        c = policy.image_logits(inputs.cond_ids, inputs.cond_mask, tokens)
        u = policy.image_logits(inputs.uncond_ids, inputs.uncond_mask, tokens)
        logits = (u + s * (c - u) if mode == "cfg" else c) / temp
        probs = torch.softmax(logits.double(), -1)
        entropy = -(probs * probs.log()).sum(-1)
        assert torch.allclose(stats.entropy.double(), entropy, atol=1e-4)
        assert (stats.entropy > 0).all() and (stats.entropy < torch.log(torch.tensor(24.0))).all()


def test_gradients_chunked_equal_unchunked_and_uncond_detached(policy: TinyPolicy) -> None:
    inputs = policy.encode_prompts(PROMPTS)
    tokens = torch.randint(0, policy.config.vocab_size, (3, 16),
                           generator=torch.Generator().manual_seed(4))
    grads = []
    for chunk in (0, 3):
        policy.zero_grad()
        policy(inputs, tokens, "cfg", 2.0, chunk_size=chunk).logprobs.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5) and grads[0].abs().sum() > 0
    # With the unconditional branch detached the cfg-mode gradient equals s * the cond gradient.
    policy.zero_grad()
    policy(inputs, tokens, "cond", 1.0).logprobs.sum().backward()
    cond_grad = torch.cat([p.grad.flatten() for p in policy.parameters()])
    policy.zero_grad()
    c = policy.image_logits(inputs.cond_ids, inputs.cond_mask, tokens)
    with torch.no_grad():
        u = policy.image_logits(inputs.uncond_ids, inputs.uncond_mask, tokens)
    g = torch.log_softmax(u + 2.0 * (c - u), -1).gather(-1, tokens[..., None]).sum()
    g.backward()
    ref = torch.cat([p.grad.flatten() for p in policy.parameters()])
    policy.zero_grad()
    assert torch.allclose(grads[0], ref, atol=1e-5)
    assert not torch.allclose(grads[0], cond_grad, atol=1e-3)


def test_seeded_sampling_is_deterministic_and_cache_matches_recompute(policy: TinyPolicy) -> None:
    inputs = policy.encode_prompts(PROMPTS * 2)
    params = SamplingParams(cfg_scale=2.0, temperature=1.0, top_k=10)
    a = policy.sample(inputs, params, torch.Generator().manual_seed(7))
    b = policy.sample(inputs, params, torch.Generator().manual_seed(7))
    c = policy.sample(inputs, params, torch.Generator().manual_seed(7), use_cache=False)
    d = policy.sample(inputs, params, torch.Generator().manual_seed(8))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert torch.equal(a.tokens, c.tokens)
    assert torch.allclose(a.logprobs, c.logprobs, atol=1e-5)
    assert not torch.equal(a.tokens, d.tokens)


def test_top_k_one_is_greedy(policy: TinyPolicy) -> None:
    inputs = policy.encode_prompts(PROMPTS)
    out = policy.sample(inputs, SamplingParams(cfg_scale=2.0, top_k=1),
                        torch.Generator().manual_seed(0))
    assert torch.allclose(out.behaviour_logprobs, torch.zeros_like(out.behaviour_logprobs))
    # every token was the arg-max of the guided distribution
    c = policy.image_logits(inputs.cond_ids, inputs.cond_mask, out.tokens)
    u = policy.image_logits(inputs.uncond_ids, inputs.uncond_mask, out.tokens)
    assert torch.equal((u + 2.0 * (c - u)).argmax(-1), out.tokens)


def test_save_load_round_trip_and_builder(policy: TinyPolicy, tmp_path) -> None:
    policy.save_pretrained(tmp_path / "m")
    loaded = TinyPolicy.from_pretrained(tmp_path / "m")
    assert loaded.config == policy.config and loaded.vocab.words == policy.vocab.words
    assert torch.equal(loaded.tokenizer.codebook, policy.tokenizer.codebook)
    for (k, v), (k2, v2) in zip(policy.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    inputs = policy.encode_prompts(PROMPTS)
    params = SamplingParams(cfg_scale=2.0)
    assert torch.equal(policy.sample(inputs, params, torch.Generator().manual_seed(5)).tokens,
                       loaded.sample(inputs, params, torch.Generator().manual_seed(5)).tokens)
    cfg = types.SimpleNamespace(kind="tiny", path=str(tmp_path / "m"), dtype="float32")
    pair = build_policy(cfg, need_reference=True)
    assert pair.reference is not None and pair.reference is not pair.policy
    assert not any(p.requires_grad for p in pair.reference.parameters())
    assert all(p.requires_grad for p in pair.policy.parameters())
    assert not pair.reference.training
    assert build_policy(cfg, need_reference=False).reference is None


def test_builder_errors_name_the_path(tmp_path) -> None:
    for path in [str(tmp_path / "nope"), str(tmp_path)]:
        with pytest.raises(UserError, match="model.path"):
            build_policy(types.SimpleNamespace(kind="tiny", path=path, dtype="float32"), False)
    with pytest.raises(UserError, match="model.lora"):
        build_policy(types.SimpleNamespace(kind="tiny", path="builtin:shapes", dtype="float32",
                                           lora=True), False)
    with pytest.raises(UserError, match="builtin:nothing"):
        build_policy(types.SimpleNamespace(kind="tiny", path="builtin:nothing", dtype="float32"),
                     False)


def test_model_kinds_come_from_the_registry() -> None:
    """model.kind's choices are the registered adapters, and a kind registered later is built
    through the same registry (docs/design.md §14)."""
    import dataclasses

    from stagerl.config import ModelConfig
    from stagerl.policies import PolicyPair, policy_kinds, register_policy
    from stagerl.policies.registry import _BUILDERS

    choices = next(f for f in dataclasses.fields(ModelConfig) if f.name == "kind").metadata["choices"]
    assert set(choices) == set(policy_kinds()) >= {"tiny", "janus"}
    register_policy("test_kind")(lambda cfg, need_reference: PolicyPair("p", None))
    try:
        assert build_policy(types.SimpleNamespace(kind="test_kind"), False).policy == "p"
    finally:
        del _BUILDERS["test_kind"]
    with pytest.raises(UserError, match="choose from janus, llamagen, tiny"):
        build_policy(types.SimpleNamespace(kind="nope"), False)
