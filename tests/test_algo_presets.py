"""The ablation presets against the rows of docs/algorithm.md §7 (the paper's Table 4)."""

from __future__ import annotations

import pytest

from stagerl.algo import PRESETS, get_preset

# docs/algorithm.md §7, transcribed: reweight, KL reweight, entropy reward, KL term on/off.
# KL reweight is "–" (None here) where there is no KL term; β = 0.03 is the GenEval run's (docs/algorithm.md §8).
TABLE = {
    "vanilla_grpo": (False, False, "off", True),
    "plus_ent": (False, False, "max_only", True),
    "stage": (True, True, "max_only", True),
    "wo_kl": (True, None, "max_only", False),
    "wo_ent_kl": (True, None, "off", False),
}


def test_keys_are_exactly_the_table_rows():
    assert list(PRESETS) == list(TABLE)


@pytest.mark.parametrize("name", list(TABLE))
def test_row_matches_method_table(name):
    reweight, kl_reweight, entropy, kl_on = TABLE[name]
    row = get_preset(name)
    assert set(row) == {"reweight", "kl_reweight", "entropy_reward", "beta"}
    assert row["reweight"] is reweight
    if kl_reweight is not None:
        assert row["kl_reweight"] is kl_reweight
    assert row["entropy_reward"] == entropy
    assert row["beta"] == (0.03 if kl_on else 0.0)


def test_get_preset_returns_a_copy():
    row = get_preset("stage")
    row["beta"] = 1.0
    assert PRESETS["stage"]["beta"] == 0.03


def test_unknown_preset_names_the_choices():
    with pytest.raises(KeyError) as err:
        get_preset("stage2")
    assert err.value.args[0] == ("unknown preset 'stage2'; choose from vanilla_grpo, plus_ent, "
                                 "stage, wo_kl, wo_ent_kl, dr_grpo, gcpo")


def test_presets_load_through_the_config():
    from stagerl.config import load_config

    cfg = load_config(overrides=["algo.preset=wo_kl"])
    assert (cfg.algo.reweight, cfg.algo.entropy_reward, cfg.algo.beta) == (True, "max_only", 0.0)
    # explicit fields override the preset row
    cfg = load_config(overrides=["algo.preset=vanilla_grpo", "algo.beta=0.01"])
    assert (cfg.algo.reweight, cfg.algo.beta) == (False, 0.01)
