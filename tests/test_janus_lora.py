"""LoRA on the tiny random Janus: reference = adapter disabled, adapters saved,
merge writes a full model that plain transformers loads."""

from __future__ import annotations

import argparse

import pytest
import torch

from stagerl.config import ModelConfig
from stagerl.errors import UserError
from stagerl.policies import build_policy
from stagerl.policies.base import SamplingParams
from stagerl.policies.janus import JanusPolicy, JanusReferenceView
from stagerl.policies.janus_lora import add_cli_args, merge_lora, run_cli
from stagerl.policies.janus_tiny import build_tiny_janus

torch.set_num_threads(1)

PROMPTS = ["a red circle", "two blue squares to the left of a green triangle"]
LORA = dict(kind="janus", tiny_random=True, lora=True, lora_r=4, lora_alpha=8)


@pytest.fixture(scope="module")
def trained() -> tuple[JanusPolicy, JanusReferenceView]:
    """A LoRA policy after two AdamW steps, and its reference view."""
    pair = build_policy(ModelConfig(**LORA), need_reference=True)
    policy, ref = pair.policy, pair.reference
    inp = policy.encode_prompts(PROMPTS)
    tokens = policy.sample(inp, SamplingParams(cfg_scale=2.0),
                           torch.Generator().manual_seed(0)).tokens
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    policy.train()
    for _ in range(2):
        loss = -(torch.tensor([[1.0], [-1.0]]) * policy(inp, tokens).logprobs).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return policy, ref


def _base_policy() -> JanusPolicy:
    model, processor = build_tiny_janus()  # same seed as the builder: the same base weights
    return JanusPolicy(model, processor)


def test_only_language_model_adapters_train(trained) -> None:
    policy, ref = trained
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and ".language_model.layers." in n for n in names)
    assert isinstance(ref, JanusReferenceView)
    assert list(ref.parameters()) == []  # owns no weights: no second copy
    ref.requires_grad_(False)  # a trainer freezing "the reference" must not freeze the adapters
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)


def test_reference_equals_base_model_exactly(trained) -> None:
    policy, ref = trained
    base = _base_policy()
    inp = policy.encode_prompts(PROMPTS)
    tokens = torch.randint(0, 128, (2, policy.num_image_tokens), generator=torch.Generator().manual_seed(1))
    for mode in ("cond", "cfg"):
        r = ref(inp, tokens, logprob_mode=mode, cfg_scale=5.0, chunk_size=100)
        b = base(inp, tokens, logprob_mode=mode, cfg_scale=5.0, chunk_size=100)
        assert torch.equal(r.logprobs, b.logprobs) and torch.equal(r.entropy, b.entropy)
        assert not r.logprobs.requires_grad
        # the adapter is back on afterwards, and it did change the policy
        p = policy(inp, tokens, logprob_mode=mode, cfg_scale=5.0)
        assert (p.logprobs - b.logprobs).abs().max().item() > 1e-4


def test_adapter_checkpoint_merge_and_plain_load(trained, tmp_path) -> None:
    from transformers import JanusForConditionalGeneration

    policy, _ = trained
    ckpt, merged = tmp_path / "ckpt", tmp_path / "merged"
    policy.save_pretrained(str(ckpt))
    assert (ckpt / "adapter_model.safetensors").is_file()
    assert (ckpt / "processor_config.json").is_file()
    assert not (ckpt / "model.safetensors").exists()  # adapters only (+ the tiny base beside)
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    assert run_cli(parser.parse_args([str(ckpt), str(merged)])) == 0
    full = JanusForConditionalGeneration.from_pretrained(str(merged)).eval()
    assert not any("lora" in k for k in full.state_dict())
    inp = policy.encode_prompts(PROMPTS)
    tokens = torch.randint(0, 128, (2, policy.num_image_tokens), generator=torch.Generator().manual_seed(2))
    from transformers import AutoProcessor

    reloaded = JanusPolicy(full, AutoProcessor.from_pretrained(str(merged)))
    with torch.no_grad():
        want = policy(inp, tokens, logprob_mode="cfg", cfg_scale=3.0).logprobs
    got = reloaded(inp, tokens, logprob_mode="cfg", cfg_scale=3.0).logprobs
    assert (want - got).abs().max().item() <= 1e-5
    # continuing from the adapter checkpoint restores the same policy and reference
    again = build_policy(ModelConfig(kind="janus", path=str(ckpt), lora=True), need_reference=True)
    assert torch.equal(again.policy(inp, tokens).logprobs, policy(inp, tokens).logprobs)
    assert torch.equal(again.reference(inp, tokens).logprobs,
                       _base_policy()(inp, tokens).logprobs)


def test_merge_rejects_non_adapter_dir(tmp_path) -> None:
    with pytest.raises(UserError, match="not a LoRA checkpoint"):
        merge_lora(str(tmp_path), str(tmp_path / "out"))


def test_bad_target_regex_is_a_user_error() -> None:
    with pytest.raises(UserError, match="model.lora_target_modules"):
        build_policy(ModelConfig(**LORA, lora_target_modules=r".*no_such_proj"), False)
