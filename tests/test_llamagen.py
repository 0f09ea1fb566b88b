"""The LlamaGen adapter on tiny random models (c2i and t2i): the policy protocol, LoRA, stagerl's
save format, the checkpoint checks (one-line user errors) and a short run of the real trainer.
Parity with the official code is tests/test_llamagen_parity.py."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stagerl.config_schema import ModelConfig
from stagerl.errors import UserError
from stagerl.policies import build_policy
from stagerl.policies.base import SamplingParams
from stagerl.policies.llamagen import from_pretrained, load_official, tiny_random
from stagerl.policies.sampling import chunk_noise, sample_tokens
from stagerl.rewards.base import RewardOutput, register_reward

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "llamagen_parity.safetensors"
PROMPTS = {"c2i": ["3", "tench", "7"], "t2i": ["a red circle", "two blue squares left of a cat",
                                               "x"]}
NAMES = ["zero", "one", "two", "tench, Tinca tinca"]


@pytest.fixture(scope="module", params=["c2i", "t2i"])
def policy(request):
    torch.manual_seed(0)
    return tiny_random(request.param, grid=4, class_names=NAMES).eval()


@pytest.mark.parametrize("mode,scale", [("cond", 3.0), ("cfg", 3.0), ("cond", 1.0)])
def test_sampling_statistics_equal_teacher_forcing(policy, mode, scale):
    kind = policy.cfg.model_type
    inputs = policy.encode_prompts(PROMPTS[kind])
    params = SamplingParams(cfg_scale=scale, temperature=0.9, top_k=20, logprob_mode=mode)
    out = policy.sample(inputs, params, noise=chunk_noise(5, 3, policy.num_image_tokens))
    assert out.tokens.shape == (3, 16) and out.tokens.max() < policy.cfg.vocab_size
    stats = policy(inputs, out.tokens, logprob_mode=mode, cfg_scale=scale, temperature=0.9,
                   chunk_size=5)
    assert torch.allclose(stats.logprobs, out.logprobs, atol=1e-5)
    assert torch.allclose(stats.entropy, out.entropy, atol=1e-5)
    # the behaviour distribution is truncated (top-k 20), the scored one is not
    assert (out.behaviour_logprobs >= out.logprobs - 1e-6).all()


def test_tokens_do_not_depend_on_micro_batching(policy):
    prompts = PROMPTS[policy.cfg.model_type]
    noise = chunk_noise(9, 3, policy.num_image_tokens)
    params = SamplingParams(cfg_scale=2.0)
    _, whole, lp, _ = sample_tokens(policy, prompts, params, noise)
    _, micro, lp1, _ = sample_tokens(policy, prompts, params, noise, micro=1)
    assert torch.equal(whole, micro) and torch.allclose(lp, lp1, atol=1e-5)


def test_codes_and_images(policy):
    tokens = torch.randint(0, policy.cfg.vocab_size, (2, 16))
    codes = policy.code_embeddings(tokens)
    assert codes.shape == (2, 16, 8)
    assert torch.allclose(codes.norm(dim=-1), torch.ones(2, 16), atol=1e-5)
    images = policy.decode(tokens)
    assert len(images) == 2 and images[0].size == (16, 16) and images[0].mode == "RGB"
    assert policy.encode_images(policy.decode_pixels(tokens)).shape == (2, 16)


def test_t2i_captions_are_left_padded_with_pads_zeroed():
    policy = tiny_random("t2i", grid=4)
    inputs = policy.encode_prompts(["a red circle", "x"])
    mask, feats = inputs.cond_mask, inputs.extra["caption"]
    assert mask.shape == (2, policy.cfg.cls_token_num)
    for row in range(2):
        valid = int(mask[row].sum())
        assert 0 < valid < mask.shape[1] and mask[row, -valid:].all()  # the caption ends last
        assert feats[row, :-valid].abs().sum() == 0 and feats[row, -valid:].abs().sum() > 0
    assert int(mask[0].sum()) > int(mask[1].sum())
    assert torch.equal(inputs.uncond_mask, mask)  # LlamaGen: the null caption, same key mask


def test_c2i_prompts_map_ids_and_names_and_refuse_the_rest():
    policy = tiny_random("c2i", grid=4, class_names=NAMES)
    ids = policy.encode_prompts(["2", "Tinca tinca", " one "]).cond_ids[:, 0].tolist()
    assert ids == [2, 3, 1]
    assert policy.encode_prompts(["5"]).uncond_ids[0, 0] == policy.cfg.num_classes
    with pytest.raises(UserError, match="out of range 0..9"):
        policy.encode_prompts(["10"])
    with pytest.raises(UserError, match="model.class_names: prompt 'a red circle' is neither"):
        policy.encode_prompts(["a red circle"])
    with pytest.raises(UserError, match="give class ids"):
        tiny_random("c2i", grid=4).encode_prompts(["a red circle"])


def _model_cfg(**kw) -> ModelConfig:
    base = dict(kind="llamagen", path="tiny-random", tiny_random=True, llamagen_type="c2i")
    base.update(kw)
    return ModelConfig(**base)


def test_lora_trains_adapters_only_and_reference_is_the_adapter_off():
    pair = build_policy(_model_cfg(lora=True, lora_r=4), need_reference=True)
    policy, reference = pair.policy, pair.reference
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("feed_forward.w2.lora_A" in n for n in trainable)
    base = tiny_random("c2i")  # the same seeded weights without adapters
    inputs = policy.encode_prompts(["1", "2"])
    tokens = torch.randint(0, 128, (2, 64))
    with torch.no_grad():
        for m in policy.model.lora_modules():
            m.lora_B.normal_(std=0.5)
    pol = policy(inputs, tokens).logprobs
    ref = reference(inputs, tokens).logprobs
    assert torch.allclose(ref, base(inputs, tokens).logprobs.detach(), atol=1e-6)
    assert (pol - ref).abs().max() > 1e-3
    assert policy.model.lora_modules()[0].enabled  # the context restored the adapters


def test_save_and_load_round_trip_with_and_without_lora(tmp_path):
    for kind, lora in (("t2i", False), ("c2i", True)):
        pair = build_policy(_model_cfg(llamagen_type=kind, lora=lora), need_reference=False)
        policy = pair.policy.eval()
        if lora:
            with torch.no_grad():
                policy.model.lora_modules()[0].lora_B.normal_()
        out = tmp_path / f"{kind}_{lora}"
        policy.save_pretrained(str(out))
        again = build_policy(_model_cfg(llamagen_type=kind, path=str(out), tiny_random=False,
                                        lora=lora), need_reference=False).policy.eval()
        assert again.is_lora == lora
        prompts = PROMPTS[kind][:2] if kind == "t2i" else ["1", "2"]
        tokens = torch.randint(0, 128, (2, 64))
        a = policy.image_logits(policy.encode_prompts(prompts), tokens)
        b = again.image_logits(again.encode_prompts(prompts), tokens)
        assert torch.allclose(a, b, atol=1e-6)
    config = json.loads((tmp_path / "t2i_False" / "config.json").read_text())
    assert config["t5"] == "t5" and (tmp_path / "t2i_False" / "t5" / "config.json").is_file()


# ---- official checkpoints: the loader's checks ---------------------------------------------------
def _official_files(tmp_path: Path) -> tuple[Path, Path]:
    from safetensors.torch import load_file

    data = load_file(str(FIXTURE))
    gpt = {k[4:]: v.float() for k, v in data.items() if k.startswith("c2i.")
           and not k[4:].startswith(("logits", "sample", "labels"))}
    vq = {k[3:]: v.float() for k, v in data.items() if k.startswith("vq.")
          and not k[3:].startswith(("pixels", "image", "codes"))}
    torch.save({"model": gpt}, tmp_path / "gpt.pt")
    torch.save({"model": vq}, tmp_path / "vq.pt")
    return tmp_path / "gpt.pt", tmp_path / "vq.pt"


def _official_cfg(gpt: Path, vq: Path, **kw) -> ModelConfig:
    return _model_cfg(tiny_random=False, path=str(gpt), vq_path=str(vq), llamagen_size="B", **kw)


@pytest.mark.parametrize("case,match", [
    ("missing", "model.path: no such file"),
    ("garbage", "is not a readable weights file"),
    ("not_llamagen", "is not a LlamaGen GPT checkpoint"),
    ("size", "model.llamagen_size: B has 12 layers of width 768, but"),
    ("type", "model.llamagen_type: 't2i', but"),
    ("vq_codebook", "model.vq_path: .* has a codebook of 32 codes, but the GPT predicts 64"),
    ("vq_not_vq", "model.vq_path: .* is not a LlamaGen VQ checkpoint"),
    ("no_vq", "model.vq_path: LlamaGen needs"),
    # right size, but the MLP width rule of the official configs does not give this file's width
    ("shape", r"model.path: .*gpt.pt does not match the configured LlamaGen model: "
              r"'layers.0.feed_forward.w1.weight' has shape \(96, 32\), expected \(256, 32\)"),
])
def test_bad_checkpoints_are_one_line_user_errors(tmp_path, case, match):
    gpt, vq = _official_files(tmp_path)
    kw: dict = {}
    if case == "missing":
        gpt = tmp_path / "nope.pt"
    elif case == "garbage":
        gpt.write_bytes(b"not a checkpoint")
    elif case == "not_llamagen":
        torch.save({"model": {"encoder.weight": torch.zeros(2)}}, gpt)
    elif case == "type":
        kw["llamagen_type"] = "t2i"
    elif case == "vq_codebook":
        sd = torch.load(vq)["model"]
        sd["quantize.embedding.weight"] = sd["quantize.embedding.weight"][:32]
        torch.save({"model": sd}, vq)
    elif case == "vq_not_vq":
        vq = gpt
    cfg = _official_cfg(gpt, vq, **kw)
    if case == "no_vq":
        cfg.vq_path = ""
    if case != "size":  # past the size check, the toy file meets the toy size
        from stagerl.policies.llamagen_model import SIZES

        SIZES["B"], saved = (2, 2, 32), SIZES["B"]
    try:
        with pytest.raises(UserError, match=match) as err:
            load_official(cfg, torch.float32)
    finally:
        if case != "size":
            SIZES["B"] = saved
    assert "\n" not in str(err.value)


def test_cli_refuses_a_non_llamagen_checkpoint_before_training(tmp_path):
    bad = tmp_path / "other.pt"
    torch.save({"model": {"encoder.weight": torch.zeros(2)}}, bad)
    cmd = [sys.executable, "-m", "stagerl", "train", str(ROOT / "configs" / "llamagen_tiny_test.yaml"),
           "model.tiny_random=false", f"model.path={bad}", f"model.vq_path={bad}",
           f"run.out_dir={tmp_path / 'runs'}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith("stagerl: error: model.path:") and "Traceback" not in res.stderr
    assert "is not a LlamaGen GPT checkpoint" in lines[-1]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("config.yaml"))


# ---- the real trainer -----------------------------------------------------------------------------
@register_reward("llamagen_test_brightness")
class Brightness:
    """Mean pixel value in [0, 1]: continuous, so groups are never tied."""

    name = "llamagen_test_brightness"

    def __call__(self, images, prompts, metadata):
        vals = [float(np.asarray(im, dtype=np.float32).mean() / 255.0) for im in images]
        return RewardOutput(torch.tensor(vals), torch.ones(len(vals), dtype=torch.bool))


def test_trainer_moves_the_gpt_and_exports_a_loadable_model(tmp_path):
    from stagerl.config import load_config
    from stagerl.trainer import train

    cfg = load_config(str(ROOT / "configs" / "llamagen_tiny_test.yaml"),
                      ["reward.names=[llamagen_test_brightness]", f"run.out_dir={tmp_path}",
                       "run.steps=1", "log.image_every=0", "optim.lr=1e-2",
                       "sampling.reuse_sample_stats=false"])
    result = train(cfg)
    rows = [json.loads(l) for l in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["rollout/logprob_gap"] <= 1e-4  # sampling vs teacher forcing
    final = result.run_dir / "final"
    trained = from_pretrained(str(final))
    start = tiny_random("t2i")
    moved = [n for n, p in trained.model.named_parameters()
             if not torch.equal(p, dict(start.model.named_parameters())[n])]
    assert moved and all(torch.equal(a, b) for a, b in
                         zip(trained.vq.state_dict().values(), start.vq.state_dict().values()))
    assert dataclasses.asdict(trained.cfg) == dataclasses.asdict(start.cfg)


def test_recipes_load_and_name_official_files():
    from stagerl.config import load_config

    recipes = sorted((ROOT / "configs").glob("llamagen_*.yaml"))
    assert {p.name for p in recipes} >= {"llamagen_tiny_test.yaml", "llamagen_c2i_xl_384.yaml",
                                         "llamagen_t2i_xl_hps.yaml"}
    for path in recipes:
        cfg = load_config(str(path))
        assert cfg.model.kind == "llamagen"
        if not cfg.model.tiny_random:
            assert cfg.model.path.endswith(".pt") and cfg.model.vq_path.endswith(".pt")
            assert f"{cfg.model.image_size}" in cfg.model.path
            assert f"_{cfg.model.llamagen_size}_" in cfg.model.path
            assert cfg.model.llamagen_type in Path(cfg.model.vq_path).name


def test_gpu_check_llamagen_phase_runs_dry_on_cpu():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    report = gpu_check.llamagen_check(dry=True, device="cpu")
    assert report["sampler_tokens_per_s"] > 0 and report["updated"] is True
    assert report["tokens"] == 4 * 16 and report["rollout_peak_gib"] is None


@pytest.mark.parametrize("case,match", [
    ("no_gpt", "model.path: no such file"),
    ("other_folder", "is a folder but not a LlamaGen model saved by stagerl"),
    ("no_vq", "model.vq_path: no such file"),
    ("no_classes", "model.class_names: no such file"),
])
def test_preflight_names_missing_files_before_any_run_folder(tmp_path, case, match):
    from stagerl.preflight import check_model_path

    gpt, vq = tmp_path / "gpt.pt", tmp_path / "vq.pt"
    gpt.write_bytes(b"x")
    vq.write_bytes(b"x")
    kw = dict(tiny_random=False, path=str(gpt), vq_path=str(vq))
    if case == "no_gpt":
        kw["path"] = str(tmp_path / "missing.pt")
    elif case == "other_folder":
        kw["path"] = str(tmp_path)
    elif case == "no_vq":
        kw["vq_path"] = str(tmp_path / "missing_vq.pt")
    else:
        kw["class_names"] = str(tmp_path / "classes.txt")
    with pytest.raises(UserError, match=match):
        check_model_path(_model_cfg(**kw))
    check_model_path(_model_cfg(tiny_random=False, path=str(gpt), vq_path=str(vq)))  # all there


@pytest.mark.parametrize("lines,match", [
    (["3", "tench", "12"], r"prompts.txt:3: data.source: prompt '12' is a class id out of range 0..9"),
    (["3", "a red circle"], r"prompts.txt:2: model.class_names: prompt 'a red circle' is neither"),
])
def test_c2i_prompts_are_checked_before_any_run_folder(tmp_path, lines, match):
    from stagerl.preflight import check_prompts_readable

    names = tmp_path / "classes.txt"
    names.write_text("\n".join(NAMES) + "\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(lines) + "\n")
    cfg = _model_cfg(class_names=str(names))
    with pytest.raises(UserError, match=match):
        check_prompts_readable(cfg, str(prompts))
    check_prompts_readable(cfg, str(names))  # the class file itself is a valid prompt source
    with pytest.raises(UserError, match="shapes:train: model.class_names: the c2i model got"):
        check_prompts_readable(_model_cfg(), "shapes:train")
    check_prompts_readable(_model_cfg(llamagen_type="t2i"), "shapes:train")  # t2i reads text


def test_bf16_weights_sample_and_score():
    policy = build_policy(_model_cfg(llamagen_type="t2i", dtype="bfloat16"),
                          need_reference=False).policy.eval()
    assert policy.model.output.weight.dtype == torch.bfloat16
    inputs = policy.encode_prompts(["a red circle", "x"])
    out = policy.sample(inputs, SamplingParams(cfg_scale=4.0), noise=chunk_noise(1, 2, 64))
    stats = policy(inputs, out.tokens, chunk_size=16)
    # bf16 keeps 8 significant bits: the cached and the full-sequence passes round differently
    assert torch.isfinite(stats.logprobs).all() and (stats.logprobs - out.logprobs).abs().max() < 0.05
    assert len(policy.decode(out.tokens)) == 2


def test_full_finetune_reference_is_a_frozen_copy_sharing_vq_and_t5():
    pair = build_policy(_model_cfg(llamagen_type="t2i"), need_reference=True)
    policy, reference = pair.policy, pair.reference
    assert all(p.requires_grad for p in policy.model.parameters())
    assert not any(p.requires_grad for p in policy.vq.parameters())
    assert not any(p.requires_grad for p in reference.parameters())
    assert reference.model is not policy.model and reference.vq is policy.vq
    assert reference.text is policy.text and policy.vq is not None
    with torch.no_grad():
        policy.model.output.weight.add_(torch.randn_like(policy.model.output.weight))
    inputs = policy.encode_prompts(["a red circle"])
    tokens = torch.randint(0, 128, (1, 64))
    assert (policy(inputs, tokens).logprobs - reference(inputs, tokens).logprobs).abs().max() > 0.1
