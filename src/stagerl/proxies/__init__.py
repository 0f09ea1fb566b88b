"""Learned proxy rewards of the shapes world, judged by its exact evaluator (docs/rewards.md,
"Learned proxy rewards"):

- ``nets.py``: the detector and scorer networks;
- ``proxy.py``: a proxy as an object (scoring, save/load, the checks that refuse the wrong folder);
- ``build.py``: its data, training and held-out agreement (``stagerl pretrain-reward``).

They live apart from ``worlds/shapes``, which they read, because they also need the base model
and the prompt sources, which themselves read the world.
"""
