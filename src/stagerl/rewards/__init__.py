"""Rewards behind one signature; see :mod:`stagerl.rewards.base`."""

from stagerl.rewards.base import (RewardFn, RewardOutput, RewardSet, available_rewards,
                                  build_reward, register_reward)

__all__ = ["RewardFn", "RewardOutput", "RewardSet", "available_rewards", "build_reward",
           "register_reward"]
