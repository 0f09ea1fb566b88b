"""GCPO's critical tokens and dynamic advantage weight against a transcription of the authors' code.

tests/fixtures/gcpo_reference.json holds seeded inputs (entropies, a code book and sampled tokens,
log-probs, rewards) and what a line-by-line transcription of the authors' trainer computed on them
(the transcription is kept outside the repository; docs/algorithm.md §11 says how it was made):
their advantages, per-position group similarity, selected tokens, loss and d loss / d ℓ, the last
both as they wrote it (κ carries gradient) and with κ detached (our reading of the paper).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stagerl.algo import (dynamic_advantage_weight, gcpo_token_mask, gcpo_weights,
                          group_advantages, loss_coefficients, stage_loss)
from stagerl.algo.gcpo import entropy_gradient, group_similarity

REF = json.loads((Path(__file__).parent / "fixtures" / "gcpo_reference.json").read_text())
T = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
IDS = [f"side{c['side']}-P{c['P']}xG{c['G']}" for c in REF["cases"]]


def _inputs(c):
    gi = torch.arange(c["P"]).repeat_interleave(c["G"])
    emb = T(c["codebook"])[torch.tensor(c["tokens"])]  # [N, L, D]
    return gi, emb, T(c["entropy"]), T(c["logp"]), T(c["ref_logp"])


def _gcpo_loss(c, logp):
    gi, emb, entropy, _, ref = _inputs(c)
    adv = group_advantages(T(c["rewards"]), gi, eps=1e-4)
    sel = gcpo_token_mask(entropy, emb, gi, frac=0.1).double()
    kappa = dynamic_advantage_weight(logp, ref, clip=0.5)
    coef, m = gcpo_weights(sel, kappa, loss_coefficients(sel, agg="batch_weighted_mean"))
    return stage_loss(logp, logp.detach(), adv, ref_logp=ref, kl_weights=m, beta=c["beta"],
                      coefficients=coef, num_tokens=float(sel.numel()))[0]


@pytest.mark.parametrize("c", REF["cases"], ids=IDS)
def test_advantages_and_similarity_match(c):
    gi, emb, *_ = _inputs(c)
    torch.testing.assert_close(group_advantages(T(c["rewards"]), gi, eps=1e-4),
                               T(c["advantages"]), rtol=0, atol=1e-9)
    torch.testing.assert_close(group_similarity(emb, gi), T(c["similarity"]), rtol=0, atol=1e-9)


@pytest.mark.parametrize("c", REF["cases"], ids=IDS)
def test_selected_tokens_match_exactly(c):
    gi, emb, entropy, *_ = _inputs(c)
    sel = gcpo_token_mask(entropy, emb, gi, frac=0.1)
    ref = torch.tensor(c["selected"], dtype=torch.bool)
    assert torch.equal(sel, ref), f"{int((sel != ref).sum())} tokens differ"
    k = int(c["side"] ** 2 * 0.1)
    assert (sel.sum(dim=1) == 3 * k).all()  # three disjoint sets of ⌊0.1·L⌋


@pytest.mark.parametrize("c", REF["cases"], ids=IDS)
def test_loss_and_gradient_match_with_kappa_detached(c):
    logp = T(c["logp"]).requires_grad_(True)
    loss = _gcpo_loss(c, logp)
    loss.backward()
    assert abs(loss.item() - c["kappa_detached"]["loss"]) <= 1e-6
    assert (logp.grad - T(c["kappa_detached"]["grad"])).abs().max() <= 1e-6
    # the authors' loss value is the same number (κ's gradient changes the gradient only)
    assert abs(loss.item() - c["authors"]["loss"]) <= 1e-6


def test_the_authors_gradient_through_kappa_is_a_real_difference():
    # documented in docs/algorithm.md §11: their κ is not detached, so their gradient differs
    c = REF["cases"][0]
    diff = (T(c["authors"]["grad"]) - T(c["kappa_detached"]["grad"])).abs().max()
    assert diff > 1e-4


def test_entropy_gradient_of_a_constant_map_is_zero_and_a_ramp_is_found():
    assert torch.equal(entropy_gradient(torch.full((2, 64), 3.0)), torch.zeros(2, 64))
    ramp = torch.zeros(1, 64)
    ramp[0, 32:] = 5.0  # a horizontal edge between rows 3 and 4 of the 8×8 map
    g = entropy_gradient(ramp).reshape(8, 8)
    assert g[3:5].min() > 0 and g[:3].max() == 0 and g[6:].max() == 0


def test_kappa_is_one_at_the_reference_and_bounded():
    lp = torch.randn(3, 16)
    assert torch.allclose(dynamic_advantage_weight(lp, lp), torch.ones(3, 16))
    k = dynamic_advantage_weight(lp, lp + 10 * torch.randn(3, 16), clip=0.5)
    assert k.min() >= torch.exp(torch.tensor(-0.5)) - 1e-6
    assert k.max() <= torch.exp(torch.tensor(0.5)) + 1e-6


def test_the_rollout_wires_gcpo_into_w_c_and_m():
    # score_rollout under algo.preset=gcpo puts the selection, κ and the KL weights where the
    # trainer's loss reads them (Scores.token_weights, loss_coef, kl_weights)
    from stagerl.config import load_config
    from stagerl.rollout import score_rollout

    c = REF["cases"][0]
    gi, emb, entropy, logp, ref = _inputs(c)
    cfg = load_config(overrides=["algo.preset=gcpo"])
    cols = T(c["rewards"])[:, None]
    sc = score_rollout(cols, torch.ones_like(cols, dtype=torch.bool), gi, emb.float(),
                       entropy.float(), None, cfg, ["r"], [None] * len(gi),
                       logp=logp.float(), ref_logp=ref.float())
    sel = torch.tensor(c["selected"], dtype=torch.float32)
    assert torch.equal(sc.token_weights, sel)
    kappa = dynamic_advantage_weight(logp.float(), ref.float(), clip=0.5)
    torch.testing.assert_close(sc.loss_coef, sel * kappa / (sel.sum() + 1e-6))
    torch.testing.assert_close(sc.kl_weights, sel * sel.numel() / sel.sum())
    with pytest.raises(ValueError, match="needs the rollout and reference log-probs"):
        score_rollout(cols, torch.ones_like(cols, dtype=torch.bool), gi, emb.float(),
                      entropy.float(), None, cfg, ["r"], [None] * len(gi))
