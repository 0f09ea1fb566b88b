"""Learned proxy rewards of the shapes world (rewards/shapes_proxy.py, proxies/):
their verdicts come from the same rule engine as gold, the shipped ones load by name and agree with
gold, a tiny one builds and round-trips, a proxy reward trains end to end with gold logged beside
it, and folders that are not the right proxy are refused before any weights load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stagerl.data import PromptItem
from stagerl.errors import UserError
from stagerl.rewards import build_reward
from stagerl.rewards.base import RewardSet
from stagerl.worlds.shapes import evaluate as evaluate_mod
from stagerl.worlds.shapes.evaluate import evaluate_image, verdict_from_parse
from stagerl.worlds.shapes.prompts import generate
from stagerl.proxies.proxy import (Proxy, load_proxy, read_proxy_meta, save_proxy,
                                         shipped_proxy_dir)
from stagerl.proxies.build import (ProxyConfig, build_proxy, detector_targets,
                                               label, proxy_card)
from stagerl.proxies.nets import DetectorNet, DetectorOutput, decode_detections
from stagerl.worlds.shapes.render import render
from stagerl.worlds.shapes.spec import WorldSpec

SPEC = WorldSpec()


def _renders(n: int, seed: int = 5, split: str = "test"):
    ex = generate(n, seed, SPEC, split)
    return np.stack([render(e.objects, SPEC) for e in ex]), [PromptItem(e.prompt, e.metadata)
                                                             for e in ex]


def _perfect_output(images: np.ndarray, items: list[PromptItem]) -> DetectorOutput:
    """Detector maps that say exactly what the exact parse says (logits from the targets)."""
    data = label(images, items, SPEC)
    t = detector_targets(data.parses, SPEC)
    onehot = lambda idx, k: torch.where(  # noqa: E731
        idx[:, None] == torch.arange(k)[None, :, None, None], 20.0, -20.0)
    return DetectorOutput(objectness=torch.where(t["obj"] > 0, 20.0, -20.0),
                          kind=onehot(t["kind"], len(SPEC.shapes) + 1),
                          color=onehot(t["color"], len(SPEC.colors) + 1), box=t["box"])


def _noisy_base_like(n: int, seed: int = 0) -> tuple[np.ndarray, list[PromptItem]]:
    """Renders with extra blobs and off-palette pixels: images with fragments and unrequested
    objects, so that strict and lenient disagree on some of them."""
    images, items = _renders(n, seed, "train")
    rng = np.random.default_rng(seed)
    images = images.copy()
    for im in images[::2]:
        y, x = rng.integers(0, 28, 2)
        im[y:y + 4, x:x + 3] = (0, 0, 255) if rng.random() < 0.5 else (90, 90, 90)
    return images, items


def test_decoded_perfect_maps_give_the_gold_verdicts_through_the_same_rules():
    # the target encoding and the decoder are inverse, and the verdicts of a parse come from one
    # function for both back ends: so perfect maps give exactly gold's strict/lenient/score
    images, items = _noisy_base_like(48)
    parses = decode_detections(_perfect_output(images, items), SPEC)
    gold = [evaluate_image(im, it.metadata, SPEC) for im, it in zip(images, items)]
    mine = [verdict_from_parse(p, it.metadata) for p, it in zip(parses, items)]
    assert [g.strict for g in gold] == [m.strict for m in mine]
    assert [g.lenient for g in gold] == [m.lenient for m in mine]
    assert [g.score for g in gold] == pytest.approx([m.score for m in mine])
    assert any(not g.strict for g in gold) and any(g.strict for g in gold)  # both outcomes seen
    assert any(g.lenient and not g.strict for g in gold)  # the strict-only failures too


def test_detector_proxy_scores_through_the_rule_engine(monkeypatch):
    calls = []
    real = evaluate_mod.evaluate_detections

    def spy(dets, md, **kw):
        calls.append(len(dets))
        return real(dets, md, **kw)

    monkeypatch.setattr(evaluate_mod, "evaluate_detections", spy)
    proxy = load_proxy("shapes_detector", "builtin", SPEC)
    images, items = _renders(6)
    proxy.scores(images, items)
    assert len(calls) == 6


@pytest.mark.parametrize("name,floor", [("shapes_detector", 0.9), ("shapes_scorer", 0.8)])
def test_shipped_proxies_load_by_name_and_agree_with_gold(name, floor):
    meta = json.loads((shipped_proxy_dir(name) / "proxy.json").read_text())
    assert (shipped_proxy_dir(name) / "CARD.md").is_file()
    assert meta["agreement"]["base_samples"]["strict_agreement"] >= floor
    reward = build_reward(name)
    images, items = _renders(32, seed=11)
    # each render with its own prompt passes gold; with the next one's prompt it mostly fails
    shifted = items[1:] + items[:1]
    pil = [__import__("PIL.Image").Image.fromarray(im) for im in images]
    own = reward(pil, [it.prompt for it in items], [it.metadata for it in items])
    other = reward(pil, [it.prompt for it in shifted], [it.metadata for it in shifted])
    gold_other = np.array([evaluate_image(im, it.metadata).strict for im, it in
                           zip(images, shifted)])
    assert own.valid.all() and other.valid.all()
    assert float(own.scores.mean()) > 0.8
    assert float(other.scores[torch.from_numpy(~gold_other)].mean()) < 0.3


def test_a_tiny_proxy_builds_saves_and_loads(tmp_path):
    cfg = ProxyConfig(renders=48, samples=16, steps=3, batch=16, eval_samples=8, eval_renders=8,
                      progress=False, width=8)
    for name in ("shapes_detector", "shapes_scorer"):
        proxy = build_proxy(name, cfg)
        out = save_proxy(proxy, tmp_path / name)
        (out / "CARD.md").write_text(proxy_card(proxy, "test"))
        assert set(proxy.meta["agreement"]) == {"base_samples", "renders"}
        again = load_proxy(name, str(out), SPEC)
        images, items = _renders(4)
        a, b = proxy.scores(images, items), again.scores(images, items)
        assert np.array_equal(a["strict"], b["strict"]) and np.allclose(a["score"], b["score"])
        assert "strict agreement" in (out / "CARD.md").read_text()


def test_folders_that_are_not_the_right_proxy_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not a proxy reward"):
        read_proxy_meta("shapes_detector", str(tmp_path / "empty"), SPEC)
    with pytest.raises(UserError, match="holds a detector proxy"):
        read_proxy_meta("shapes_scorer", "builtin:shapes_detector", SPEC)
    with pytest.raises(UserError, match="another world spec .canvas: 32"):
        read_proxy_meta("shapes_detector", "builtin", WorldSpec(canvas=48, object_size=(8, 12)))
    with pytest.raises(UserError, match="no shipped proxy"):
        read_proxy_meta("shapes_detector", "builtin:nope", SPEC)
    # a proxy.json that is not ours, and weights that do not fit the declared width
    bad = tmp_path / "bad"
    save_proxy(Proxy("detector", DetectorNet(3, 6, 4), SPEC, {"config": {"width": 8}}), bad)
    with pytest.raises(UserError, match="does not match"):
        load_proxy("shapes_detector", str(bad), SPEC)
    (bad / "proxy.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(UserError, match="is not a proxy reward"):
        read_proxy_meta("shapes_detector", str(bad), SPEC)


def test_gold_monitors_come_with_a_proxy_and_share_its_world():
    rs = RewardSet(["shapes_detector"])
    mon = rs.monitors()
    assert mon is not None and mon.names == ["shapes_strict", "shapes_lenient"]
    assert RewardSet(["shapes_strict"]).monitors() is None
    both = RewardSet(["shapes_scorer"], {"shapes_partial": {"variant": "parity"}},
                     monitored=["shapes_partial"]).monitors(
        ["shapes_partial"], {"shapes_partial": {"variant": "parity"}})
    assert both.names == ["shapes_partial", "shapes_strict", "shapes_lenient"]
    with pytest.raises(UserError, match="reward.kwargs"):
        RewardSet(["shapes_detector"], {"shapes_partial": {}})  # not trained on nor monitored


def test_a_proxy_reward_trains_end_to_end_with_gold_logged_beside_it(tmp_path):
    from stagerl.config import load_config
    from stagerl.tracking import read_metrics
    from stagerl.trainer import train

    cfg = load_config(None, [
        "reward.names=[shapes_detector]", "run.steps=2", "sampling.prompts_per_step=2",
        "sampling.group_size=4", "log.eval_prompts=6", "log.eval_images_per_prompt=1",
        "log.tensorboard=false", "log.image_every=0", f"run.out_dir={tmp_path}", "run.name=p"])
    result = train(cfg)
    rows = [r for r in read_metrics(result.run_dir) if "reward/shapes_detector/mean" in r]
    assert len(rows) == 2
    for r in rows:
        for key in ("monitor/shapes_strict/mean", "monitor/shapes_lenient/mean",
                    "policy/kl_seq_k3", "policy/kl_k3"):
            assert np.isfinite(r[key]), key
        assert r["policy/kl_seq_k3"] == pytest.approx(r["policy/kl_k3"] * 64, rel=1e-4, abs=1e-9)
    after = json.loads((result.run_dir / "eval_after.json").read_text())
    assert set(after["proxy"]) == {"shapes_detector"}
    assert 0.0 <= after["proxy"]["shapes_detector"] <= 1.0
    from stagerl.report import write_plots  # stagerl report plots gold and proxy against sqrt(KL)

    assert result.run_dir / "plots" / "gold_proxy.png" in write_plots(result.run_dir)
