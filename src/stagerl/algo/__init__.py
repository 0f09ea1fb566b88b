"""The STAGE algorithm (arXiv 2509.25027) as pure tensor functions (docs/design.md §1).

No nn.Module, no config objects, no I/O: tensors and numbers in, tensors and metric dicts out.
Where each symbol of docs/algorithm.md lives:

| symbol                                   | function                          | docs/algorithm.md |
|------------------------------------------|-----------------------------------|------|
| R_i = Σ_k w_k r_{k,i}, tied-column drop  | advantages.combine_rewards        | §2   |
| A_i = (R_i − mean_g R)/(std_g R + ε)     | advantages.group_advantages       | §2   |
| e_i, 1 − e_i, λ, max_only / all / off    | entropy.entropy_reward, entropy_gap | §3 |
| s_{ij,t}                                 | weights.pairwise_similarity       | §4.1 |
| P_i (fixed / parity), c̄_{i,t}            | weights.mean_opposite_similarity  | §4.2-§4.3 |
| w_{i,t}, tied-group rule                 | weights.token_weights             | §4.4, §4.6 |
| (w, m) as trained, reweighting off       | weights.loss_weights              | §4.4-§4.6 |
| ρ, ε_low / ε_high, L_pg                  | losses.policy_loss                | §5   |
| c_{i,t} of each aggregation              | losses.loss_coefficients          | §5   |
| m_{i,t}                                  | weights.kl_weights                | §6   |
| KL_k1 / KL_k2 / KL_k3                    | kl.kl_divergence                  | §6   |
| β Σ m·KL / tokens                        | losses.kl_loss                    | §6   |
| L = L_pg + β·KL                          | losses.stage_loss                 | §5, §6 |
| Table 4 rows; peer rows (dr_grpo, gcpo)  | presets.PRESETS, PEER_PRESETS     | §7, §10, §11 |
| ρ per token / per sequence (GSPO)        | losses.importance_ratio           | §10  |
| GCPO selection, κ, (c, m)                | gcpo.gcpo_token_mask, dynamic_advantage_weight, gcpo_weights | §11 |
"""

from stagerl.algo.advantages import (ADV_SCALES, CombinedRewards, combine_rewards,
                                     group_advantages)
from stagerl.algo.gcpo import dynamic_advantage_weight, gcpo_token_mask, gcpo_weights
from stagerl.algo.entropy import ENTROPY_MODES, entropy_gap, entropy_reward, entropy_score
from stagerl.algo.kl import KL_ESTIMATORS, kl_divergence, register_kl_estimator
from stagerl.algo.losses import (LOSS_AGGREGATIONS, RATIO_LEVELS, importance_ratio, kl_loss,
                                 loss_coefficients, policy_loss, register_loss_agg, stage_loss)
from stagerl.algo.presets import PEER_PRESETS, PRESETS, get_preset
from stagerl.algo.weights import (PARTNER_SETS, SIGN_ZERO_TOL, apply_tied_rule, kl_weights,
                                  loss_weights, mean_opposite_similarity, pairwise_similarity,
                                  partner_mask, token_weights)

__all__ = [
    "ADV_SCALES", "CombinedRewards", "combine_rewards", "group_advantages",
    "dynamic_advantage_weight", "gcpo_token_mask", "gcpo_weights",
    "ENTROPY_MODES", "entropy_gap", "entropy_reward", "entropy_score",
    "KL_ESTIMATORS", "kl_divergence", "register_kl_estimator",
    "LOSS_AGGREGATIONS", "RATIO_LEVELS", "importance_ratio", "kl_loss", "loss_coefficients",
    "policy_loss", "register_loss_agg", "stage_loss",
    "PEER_PRESETS", "PRESETS", "get_preset",
    "PARTNER_SETS", "SIGN_ZERO_TOL", "apply_tied_rule", "kl_weights", "loss_weights",
    "mean_opposite_similarity", "pairwise_similarity", "partner_mask", "token_weights",
]
