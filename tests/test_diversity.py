"""Within-prompt diversity (src/stagerl/quality.py): hand examples, a brute-force check, and the
study evaluation's keys (docs/study.md, "Quality and drift")."""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import make_tiny_policy
from stagerl.quality import (distinct_image_frac, pairwise_code_distance,
                             pretraining_code_histogram, quality_measures,
                             within_prompt_diversity)
from stagerl.worlds.shapes.prompts import generate


def test_identical_and_all_different_groups():
    same = torch.tensor([[3, 1, 4, 1]] * 4 + [[2, 7, 1, 8]] * 4)  # 2 prompts x 4 images
    assert within_prompt_diversity(same, 4) == {"code_distance": 0.0, "distinct_frac": 0.0}
    apart = torch.arange(6).repeat_interleave(5).reshape(6, 5)  # row i is all i: every pair differs
    assert within_prompt_diversity(apart, 3) == {"code_distance": 1.0, "distinct_frac": 1.0}


def test_a_mixed_case_by_hand():
    tokens = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0],    # prompt 0: a, a, c
                           [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 1]])   # prompt 1: 3 distinct
    # prompt 0: pair distances 0, 1/2, 1/2 -> 1/3; 2 distinct -> (2-1)/(3-1) = 1/2
    # prompt 1: pair distances 1/4, 1/2, 1/4 -> 1/3; 3 distinct -> 1
    assert pairwise_code_distance(tokens, 3) == pytest.approx(1 / 3)
    assert distinct_image_frac(tokens, 3) == pytest.approx(0.75)


def test_matches_a_brute_force_definition():
    g = torch.Generator().manual_seed(0)
    k, tokens = 5, torch.randint(0, 3, (20, 6), generator=g)
    tokens[5:10] = tokens[5]  # one collapsed prompt
    groups = tokens.reshape(4, k, 6).tolist()
    dist = [sum(sum(a != b for a, b in zip(x, y)) / 6 for x, y in itertools.combinations(grp, 2))
            / (k * (k - 1) / 2) for grp in groups]
    frac = [(len({tuple(r) for r in grp}) - 1) / (k - 1) for grp in groups]
    assert pairwise_code_distance(tokens, k) == pytest.approx(sum(dist) / 4)
    assert distinct_image_frac(tokens, k) == pytest.approx(sum(frac) / 4)


@pytest.mark.parametrize("n, k", [(6, 1), (7, 3), (0, 2)])
def test_rows_that_are_not_groups_are_refused(n, k):
    with pytest.raises(ValueError, match="groups"):
        within_prompt_diversity(torch.zeros(n, 4, dtype=torch.long), k)


def test_quality_measures_add_diversity_and_change_nothing_else():
    policy = make_tiny_policy(grid=8)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, policy.config.vocab_size, (6, 64), generator=g)
    tokens[3:6] = tokens[3]  # prompt 0: three random images; prompt 1: one image three times
    images = policy.decode(tokens)
    prompts = [ex.prompt for ex in generate(2, seed=0, split="train") for _ in range(3)]
    hist, _ = pretraining_code_histogram(policy, n_examples=50)
    plain = quality_measures(policy, policy, prompts, images, hist)
    grouped = quality_measures(policy, policy, prompts, images, hist, group_size=3)
    assert "diversity_code_distance" not in plain
    assert {k: grouped[k] for k in plain} == plain
    assert grouped["diversity_distinct_frac"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert 0.4 < grouped["diversity_code_distance"] < 0.5  # (~1 - 1/V + 0) / 2


def test_the_quality_table_shows_diversity_only_when_measured():
    from test_study import _disk_summary

    from stagerl.study.common import StudySummary
    from stagerl.study.report import group_runs, quality_table

    old = StudySummary.from_dict(_disk_summary())  # stored before diversity was measured
    assert "within-prompt" not in quality_table(old, group_runs(old))
    d = _disk_summary()
    d["base"] = {**d["base"], "quality": {**d["base"]["quality"],
                                          "diversity_code_distance": 0.375,
                                          "diversity_distinct_frac": 0.625}}
    new = StudySummary.from_dict(d)
    table = quality_table(new, group_runs(new))
    assert "within-prompt code distance" in table and "0.375" in table and "0.625" in table
