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


def get_preset(name: str) -> dict[str, Any]:
    """A copy of the AlgoConfig fields of one Table-4 row; KeyError names the choices."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
