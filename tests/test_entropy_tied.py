"""algo.entropy_tied: what a group tied on the combined reward gets from the entropy reward
(docs/algorithm.md §3). "keep" (the authors') gives it the bonus, which the tiny group std then
scales to a full-size advantage; "drop" gives it none, so its advantages are exactly 0. Groups
with a reward signal are the same under both.
"""

from __future__ import annotations

import pytest
import torch

from stagerl.algo import entropy_reward, group_advantages
from stagerl.errors import UserError

# group 0 is tied (every R = 1), group 1 is not; entropies differ within both groups
R = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
GI = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
H = torch.tensor([0.10, 0.20, 0.30, 0.40, 0.15, 0.35, 0.05, 0.45], dtype=torch.float64)
H_REF = torch.full((8,), 0.25, dtype=torch.float64)
TIED, UNTIED = GI == 0, GI == 1


@pytest.mark.parametrize("mode", ["max_only", "all"])
def test_tied_group_gets_a_full_size_advantage_under_keep(mode):
    total, bonus = entropy_reward(R, H, H_REF, GI, mode=mode, tied="keep")
    assert bonus[TIED].abs().min() > 0
    adv = group_advantages(total, GI)
    # the bonus is ~1e-2 but normalised by its own std: advantages of order 1
    assert adv[TIED].abs().max() > 0.5


@pytest.mark.parametrize("mode", ["max_only", "all"])
def test_tied_group_gets_zero_advantage_under_drop(mode):
    total, bonus = entropy_reward(R, H, H_REF, GI, mode=mode, tied="drop")
    assert torch.equal(bonus[TIED], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(group_advantages(total, GI)[TIED], torch.zeros(4))


@pytest.mark.parametrize("mode", ["max_only", "all"])
def test_untied_groups_are_the_same_under_keep_and_drop(mode):
    keep = entropy_reward(R, H, H_REF, GI, mode=mode, tied="keep")
    drop = entropy_reward(R, H, H_REF, GI, mode=mode, tied="drop")
    max_samples = UNTIED & (R == 1)
    assert drop[1][max_samples].abs().min() > 0  # the untied group's max samples keep their bonus
    assert torch.equal(keep[0][UNTIED], drop[0][UNTIED])
    assert torch.equal(keep[1][UNTIED], drop[1][UNTIED])


def test_tie_threshold_is_tied_std():
    r = R.clone()
    r[1] += 1e-7  # below the threshold: still tied
    _, bonus = entropy_reward(r, H, H_REF, GI, mode="all", tied="drop", tied_std=1e-6)
    assert torch.equal(bonus[TIED], torch.zeros(4, dtype=torch.float64))
    _, bonus = entropy_reward(r, H, H_REF, GI, mode="all", tied="drop", tied_std=1e-9)
    assert bonus[TIED].abs().max() > 0


def test_unknown_value_is_refused():
    with pytest.raises(UserError, match="entropy_tied"):
        entropy_reward(R, H, H_REF, GI, tied="zero")


def test_the_rollout_passes_entropy_tied():
    from stagerl.config import load_config
    from stagerl.rollout import score_rollout

    n, length = 8, 16
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(n, length, 4), dim=-1)
    # per-token entropies whose sequence means are H; the reference's are H_REF
    ent = H.float()[:, None].expand(n, length).contiguous()
    ref = H_REF.float()[:, None].expand(n, length).contiguous()
    adv = {}
    for tied in ("keep", "drop"):
        cfg = load_config(overrides=["algo.preset=plus_ent", f"algo.entropy_tied={tied}"])
        sc = score_rollout(R[:, None], torch.ones(n, 1, dtype=torch.bool), GI, emb, ent, ref, cfg,
                           ["a"], [None] * n)
        adv[tied] = sc.advantages
    assert adv["keep"][TIED].abs().max() > 0.5
    assert torch.equal(adv["drop"][TIED], torch.zeros(4))
    torch.testing.assert_close(adv["keep"][UNTIED], adv["drop"][UNTIED])
