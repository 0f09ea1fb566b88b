"""Ablation presets: the rows of the paper's Table 4 (docs/algorithm.md §7).

Each row sets four ``AlgoConfig`` fields; explicit config fields override a preset.

| row          | paper name                  | reweight | kl_reweight | entropy_reward | beta |
|--------------|-----------------------------|----------|-------------|----------------|------|
| vanilla_grpo | "Baseline" / "w/o Ent"      | off      | off         | off            | 0.03 |
| plus_ent     | "+Ent" / "w/o Reweight"     | off      | off         | max_only       | 0.03 |
| stage        | "Ours"                      | on       | on          | max_only       | 0.03 |
| wo_kl        | "w/o KL"                    | on       | (on)        | max_only       | 0    |
| wo_ent_kl    | "w/o Ent & KL"              | on       | (on)        | off            | 0    |

β = 0.03 is the authors' GenEval-run value (docs/algorithm.md §8). The table marks the KL reweight "–"
for the two rows without a KL term: with β = 0 the KL weights m are inert. We keep it on there so
that those rows differ from ``stage`` only in the switches the table turns off. ``wo_kl`` keeps the
entropy reward, so it still needs the reference model (for H̄^ref), though not for a KL term.

Peer methods beside the table (each row also names the fields it takes from the defaults above):

| row     | method                                   | differs from vanilla_grpo in                   |
|---------|------------------------------------------|------------------------------------------------|
| dr_grpo | Dr. GRPO scaling (arXiv 2503.20783)      | adv_scale none, loss_agg constant              |
| gcpo    | GCPO (arXiv 2509.22485, §11)             | token_select gcpo, loss_agg batch_weighted_mean, beta 0.04 |

``dr_grpo`` keeps β = 0.03 so that it differs from ``vanilla_grpo`` in the scaling only (the Dr. GRPO
paper itself drops the KL). ``gcpo`` takes the authors' β = 0.04 (their GRPOConfig default; their
launch scripts are not in the code they published) and their loss, a token mean over the selected
tokens of the local batch (docs/algorithm.md §11).
"""

from __future__ import annotations

import copy
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "vanilla_grpo": {"reweight": False, "kl_reweight": False, "entropy_reward": "off",
                     "beta": 0.03},
    "plus_ent": {"reweight": False, "kl_reweight": False, "entropy_reward": "max_only",
                 "beta": 0.03},
    "stage": {"reweight": True, "kl_reweight": True, "entropy_reward": "max_only", "beta": 0.03},
    "wo_kl": {"reweight": True, "kl_reweight": True, "entropy_reward": "max_only", "beta": 0.0},
    "wo_ent_kl": {"reweight": True, "kl_reweight": True, "entropy_reward": "off", "beta": 0.0},
}

#: Peer methods (the table above, second half); kept apart so that PRESETS stays Table 4.
PEER_PRESETS: dict[str, dict[str, Any]] = {
    "dr_grpo": {"reweight": False, "kl_reweight": False, "entropy_reward": "off", "beta": 0.03,
                "adv_scale": "none", "loss_agg": "constant"},
    "gcpo": {"reweight": False, "kl_reweight": False, "entropy_reward": "off", "beta": 0.04,
             "token_select": "gcpo", "loss_agg": "batch_weighted_mean"},
}


def get_preset(name: str) -> dict[str, Any]:
    """A copy of the AlgoConfig fields of one preset row; KeyError names the choices."""
    rows = {**PRESETS, **PEER_PRESETS}
    if name not in rows:
        raise KeyError(f"unknown preset {name!r}; choose from {', '.join(rows)}")
    return copy.deepcopy(rows[name])
