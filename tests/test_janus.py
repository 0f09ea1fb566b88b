"""Janus policy adapter on a tiny random Janus: offline, CPU, fp32."""

from __future__ import annotations

import pytest
import torch

from stagerl.config import ModelConfig
from stagerl.errors import UserError
from stagerl.policies import build_policy
from stagerl.policies.base import Policy, SamplingParams
from stagerl.policies.janus import JanusPolicy, set_trainable
from stagerl.policies.sampling import truncate_logits
from stagerl.policies.janus_tiny import build_tiny_janus

torch.set_num_threads(1)

PROMPTS = ["a red circle", "two blue squares to the left of a big green triangle", "a cat"]


@pytest.fixture(scope="module")
def small() -> JanusPolicy:
    model, processor = build_tiny_janus(seed=1, grid=4)  # L = 16 keeps sampling fast
    return JanusPolicy(model, processor).eval()


def test_protocol_and_grid(small: JanusPolicy) -> None:
    assert isinstance(small, Policy)
    assert small.grid == (4, 4) and small.num_image_tokens == 16


def test_prompt_template_padding_and_unconditional_branch(small: JanusPolicy) -> None:
    inp = small.encode_prompts(PROMPTS)
    tok = small.tokenizer
    lengths = inp.cond_mask.sum(1)
    assert len(set(lengths.tolist())) == 3  # different lengths -> real left padding
    for i, prompt in enumerate(PROMPTS):
        row = inp.cond_ids[i][inp.cond_mask[i].bool()].tolist()
        assert row[0] == tok.bos_token_id and row[-1] == tok.convert_tokens_to_ids(tok.boi_token)
        text = tok.decode(row[1:-1])
        assert text == f"<|User|>: {prompt}\n\n<|Assistant|>:"
        assert (inp.cond_ids[i][~inp.cond_mask[i].bool()] == tok.pad_token_id).all()
    # Janus' rule (generate(generation_mode="image")): all but BOS/BOI -> pad, same mask.
    special = {tok.bos_token_id, tok.convert_tokens_to_ids(tok.boi_token)}
    for c, u in zip(inp.cond_ids.flatten().tolist(), inp.uncond_ids.flatten().tolist()):
        assert u == (c if c in special else tok.pad_token_id)
    assert torch.equal(inp.uncond_mask, inp.cond_mask)


@pytest.mark.parametrize("mode", ["cond", "cfg"])
def test_sampling_logprobs_match_teacher_forcing(small: JanusPolicy, mode: str) -> None:
    inp = small.encode_prompts(PROMPTS)
    params = SamplingParams(cfg_scale=3.0, temperature=0.8, logprob_mode=mode)
    out = small.sample(inp, params, generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == (3, 16) and out.logprobs.dtype == torch.float32
    for chunk in (0, 5):
        stats = small(inp, out.tokens, logprob_mode=mode, cfg_scale=3.0, temperature=0.8,
                      chunk_size=chunk)
        assert (stats.logprobs - out.logprobs).abs().max().item() <= 1e-4
        assert stats.entropy.shape == (3, 16) and (stats.entropy > 0).all()
    if mode == "cfg":  # no truncation: behaviour and scored distributions coincide
        assert torch.allclose(out.behaviour_logprobs, out.logprobs, atol=1e-5)
    else:
        assert not torch.allclose(out.behaviour_logprobs, out.logprobs, atol=1e-3)
    # Sanity: the check above can fail; other tokens get other log-probs.
    other = small(inp, out.tokens.roll(1, dims=1), logprob_mode=mode, cfg_scale=3.0,
                  temperature=0.8).logprobs
    assert (other - out.logprobs).abs().max().item() > 1e-2


def test_own_cfg_loop_reproduces_generate(small: JanusPolicy) -> None:
    inp = small.encode_prompts(PROMPTS)
    torch.manual_seed(123)
    ref = small.sample_with_generate(inp, 5.0)
    torch.manual_seed(123)
    ours = small.sample(inp, SamplingParams(cfg_scale=5.0)).tokens
    assert torch.equal(ref, ours)


def test_truncation_top_k_and_top_p(small: JanusPolicy) -> None:
    inp = small.encode_prompts(PROMPTS[:2])
    for k, p in ((1, 1.0), (0, 1e-6)):
        params = SamplingParams(cfg_scale=2.0, top_k=k, top_p=p, logprob_mode="cfg")
        out = small.sample(inp, params, generator=torch.Generator().manual_seed(0))
        assert torch.all(out.behaviour_logprobs == 0)  # one token left: probability 1
        # the scored distribution is never truncated, so it still spreads mass elsewhere
        assert (out.logprobs < -1e-3).all()
        stats = small(inp, out.tokens, logprob_mode="cfg", cfg_scale=2.0)
        assert (out.logprobs - stats.logprobs).abs().max().item() <= 1e-4
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(truncate_logits(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    # p = 0.7: 0.644 (first) < 0.7, so the second token is kept, the rest dropped
    assert torch.isinf(truncate_logits(logits, 0, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.equal(truncate_logits(logits, 0, 1.0), logits)


def test_cfg_mode_detaches_unconditional_branch(small: JanusPolicy) -> None:
    grad_flags: list[bool] = []
    hook = small.core.model.language_model.register_forward_hook(
        lambda *_: grad_flags.append(torch.is_grad_enabled()))
    try:
        inp = small.encode_prompts(PROMPTS[:2])
        tokens = torch.randint(0, 128, (2, 16))
        small(inp, tokens, logprob_mode="cfg", cfg_scale=3.0)
        small(inp, tokens, logprob_mode="cond")
    finally:
        hook.remove()
    assert grad_flags == [True, False, True]  # cfg: cond with grad, uncond without; cond: one pass


def test_chunked_forward_matches_in_value_and_gradient() -> None:
    model, processor = build_tiny_janus(seed=2, grid=4)
    policy = JanusPolicy(model, processor)
    set_trainable(policy.core, ["language_model"])
    inp = policy.encode_prompts(PROMPTS)
    tokens = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    for chunk in (0, 3):
        policy.zero_grad()
        stats = policy(inp, tokens, logprob_mode="cfg", cfg_scale=2.0, chunk_size=chunk)
        (stats.logprobs.sum() + stats.entropy.sum()).backward()
        grads.append([p.grad.clone() for p in policy.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_decode_and_code_embeddings(small: JanusPolicy) -> None:
    tokens = torch.randint(0, 128, (2, 16))
    images = small.decode(tokens)
    assert len(images) == 2 and images[0].size == (16, 16) and images[0].mode == "RGB"
    codes = small.code_embeddings(tokens)
    assert codes.shape == (2, 16, 8)
    assert torch.allclose(codes.norm(dim=-1), torch.ones(2, 16), atol=1e-5)
    book = small.core.model.vqmodel.quantize.embedding.weight
    assert torch.allclose(codes[1, 3], book[tokens[1, 3]] / book[tokens[1, 3]].norm(), atol=1e-6)


FROZEN = ("vision_model", "aligner", "vqmodel", "generation_embeddings", "generation_aligner",
          "generation_head")


def _policy_gradient_steps(policy: JanusPolicy, steps: int) -> None:
    """Plain AdamW on -A * log pi with fixed random advantages (no trainer needed)."""
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    inp = policy.encode_prompts(PROMPTS[:2])
    out = policy.sample(inp, SamplingParams(cfg_scale=2.0), torch.Generator().manual_seed(0))
    adv = torch.tensor([[1.0], [-1.0]])
    policy.train()
    for _ in range(steps):
        stats = policy(inp, out.tokens, chunk_size=64)
        loss = -(adv * stats.logprobs).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_two_training_steps_change_only_the_language_model() -> None:
    cfg = ModelConfig(kind="janus", tiny_random=True, gradient_checkpointing=True)
    pair = build_policy(cfg, need_reference=True)
    policy, ref = pair.policy, pair.reference
    assert policy.grid == (8, 8)  # the builder's tiny model: 8x8 grid, 32 px (shapes canvas)
    assert policy.decode(torch.zeros(1, 64, dtype=torch.long))[0].size == (32, 32)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    ref_before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".language_model." in n for n in trainable)
    assert any(f".{m}." in n for n in before for m in FROZEN)
    _policy_gradient_steps(policy, 2)
    for n, p in policy.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == (n in trainable), n
    assert all(torch.equal(ref_before[n], p) for n, p in ref.named_parameters())
    assert not any(p.requires_grad for p in ref.parameters())


def test_train_modules_is_configurable() -> None:
    model, processor = build_tiny_janus(grid=4)
    assert set_trainable(model, ["generation_head"]) == sum(
        p.numel() for p in model.model.generation_head.parameters())
    assert all(p.requires_grad == (".generation_head." in n) for n, p in model.named_parameters())
    with pytest.raises(UserError, match="model.train_modules"):
        set_trainable(model, ["no_such_module"])
    with pytest.raises(UserError, match="not a valid regex"):
        set_trainable(model, ["(unclosed"])


def test_save_then_plain_from_pretrained_round_trip(small: JanusPolicy, tmp_path) -> None:
    from transformers import AutoProcessor, JanusForConditionalGeneration

    small.save_pretrained(str(tmp_path))
    loaded = JanusForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    processor = AutoProcessor.from_pretrained(str(tmp_path))
    assert type(processor).__name__ == "JanusProcessor"
    again = JanusPolicy(loaded, processor)
    inp = small.encode_prompts(PROMPTS)
    assert torch.equal(again.encode_prompts(PROMPTS).cond_ids, inp.cond_ids)
    tokens = torch.randint(0, 128, (3, 16))
    for mode in ("cond", "cfg"):
        a = small(inp, tokens, logprob_mode=mode, cfg_scale=3.0)
        b = again(inp, tokens, logprob_mode=mode, cfg_scale=3.0)
        assert torch.equal(a.logprobs, b.logprobs) and torch.equal(a.entropy, b.entropy)
    # text logits too (tied lm_head survives the round trip)
    ids = inp.cond_ids
    assert torch.equal(small.core(input_ids=ids).logits, loaded(input_ids=ids).logits)
    # and the builder loads the directory as model.path
    built = build_policy(ModelConfig(kind="janus", path=str(tmp_path)), need_reference=False)
    assert built.reference is None
    assert torch.equal(built.policy(inp, tokens).logprobs, small(inp, tokens).logprobs)


@pytest.mark.parametrize("path", ["./no/such/janus", "/nonexistent/janus-pro"])
def test_missing_local_path_is_a_user_error(path: str) -> None:
    with pytest.raises(UserError, match="model.path.*" + path.split("/")[-1]):
        build_policy(ModelConfig(kind="janus", path=path), need_reference=False)


def test_unloadable_directory_is_a_user_error(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match=str(tmp_path)):
        build_policy(ModelConfig(kind="janus", path=str(tmp_path)), need_reference=False)


# ---- recipes (docs/algorithm.md §8) ------------------------------------------------------------------------
from pathlib import Path  # noqa: E402

from stagerl.config import load_config  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SECTION6 = {  # run: (lr, beta, entropy reward, grad accumulation, reward names)
    "geneval": (5e-6, 0.03, "max_only", 1, ["geneval"]),
    "hps_git_gdino": (1e-6, 0.01, "off", 2, ["hps", "git_vqa", "grounding_dino"]),
    "ocr": (1e-6, 0.01, "off", 1, ["ocr"]),
}


@pytest.mark.parametrize("size", ["7b", "1b"])
@pytest.mark.parametrize("run", sorted(SECTION6))
def test_janus_pro_recipes_match_the_paper(size: str, run: str) -> None:
    cfg = load_config(str(CONFIGS / f"janus_pro_{size}_{run}.yaml"))
    lr, beta, ent, accum, names = SECTION6[run]
    assert cfg.model.kind == "janus" and cfg.model.path.endswith(f"Janus-Pro-{size.upper()}")
    assert cfg.model.train_modules == ["language_model"] and not cfg.model.lora
    assert (cfg.optim.lr, cfg.algo.beta, cfg.algo.entropy_reward) == (lr, beta, ent)
    assert cfg.reward.names == names and cfg.sampling.group_size == 8
    assert (cfg.sampling.cfg_scale, cfg.sampling.temperature, cfg.sampling.top_k) == (5.0, 1.0, 0)
    assert (cfg.optim.grad_clip, cfg.optim.schedule, cfg.optim.warmup_steps) == (1.0, "linear", 0)
    assert cfg.run.steps == 1600 and cfg.run.mixed_precision == "bf16"
    # one prompt per GPU on 8 GPUs (x2 prompts for the accumulated run, split in 2 micro-batches)
    assert cfg.sampling.prompts_per_step == 8 * accum and cfg.optim.grad_accum == accum
    assert cfg.algo.reweight and cfg.algo.kl_reweight
    assert cfg.algo.loss_agg == "group_weighted_mean"  # per-group Σw, the authors' per-GPU loss
    assert cfg.model.prompt_template == "User: {prompt}\n\nAssistant:"  # their template
    # The HPS+GIT+GroundingDINO run: a plain sum of its rewards (no tied-column drop), on the
    # T2I-R1 prompts with their metadata, scored as the authors' reward code does.
    hps = run == "hps_git_gdino"
    assert cfg.reward.drop_tied_columns is not hps
    if hps:
        assert cfg.data.source == "t2i-r1"
        assert cfg.reward.kwargs["git_vqa"]["scoring"] == "parity"
        assert cfg.reward.kwargs["grounding_dino"]["scoring"] == "parity"


def test_recipe_template_reaches_the_prompt(tmp_path) -> None:
    from stagerl.policies.janus import JanusPolicy
    from stagerl.policies.janus_tiny import build_tiny_janus

    model, processor = build_tiny_janus()
    policy = JanusPolicy(model, processor, "User: {prompt}\n\nAssistant:")
    row = policy.encode_prompts(["a red circle"]).cond_ids[0].tolist()
    assert policy.tokenizer.decode(row[1:-1]) == "User: a red circle\n\nAssistant:"


def test_accelerate_launch_files_parse() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {}
    for f in sorted((CONFIGS / "accelerate").glob("*.yaml")):
        c = load_config_from_file(str(f))
        kinds[f.stem] = (str(c.distributed_type).split(".")[-1],
                         (c.deepspeed_config or {}).get("zero_stage"),
                         (c.deepspeed_config or {}).get("offload_optimizer_device"))
    assert kinds["ddp"][0] == "MULTI_GPU" and kinds["fsdp"][0] == "FSDP"
    assert kinds["deepspeed_zero2"][1:] == (2, "none")
    assert kinds["deepspeed_zero2_offload"][1:] == (2, "cpu")
    assert kinds["deepspeed_zero3"][1:] == (3, "none")
    assert kinds["deepspeed_zero3_offload"][1:] == (3, "cpu")
    assert kinds["multinode_example"][1] == 3


@pytest.mark.parametrize("compile_step", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_static_cache_sampler_draws_the_same_tokens(small: JanusPolicy, compile_step: bool) -> None:
    """sampling.cache=static (+ sampling.compile) is a faster path to the same tokens."""
    inp = small.encode_prompts(PROMPTS)
    noise = torch.rand(len(PROMPTS), small.num_image_tokens,
                       generator=torch.Generator().manual_seed(4))
    ref = small.sample(inp, SamplingParams(cfg_scale=5.0, logprob_mode="cfg"), noise=noise)
    out = small.sample(inp, SamplingParams(cfg_scale=5.0, logprob_mode="cfg", cache="static",
                                           compile=compile_step), noise=noise)
    assert torch.equal(out.tokens, ref.tokens)
    torch.testing.assert_close(out.logprobs, ref.logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.entropy, ref.entropy, rtol=0, atol=1e-5)
