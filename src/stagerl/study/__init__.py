"""The experiment harness, apart from the trainer: the STAGE-vs-GRPO reproduction study
(``stagerl study``, docs/study.md).

- :mod:`stagerl.study.run`: the plan's training runs and their evaluation, reused when unchanged.
- :mod:`stagerl.study.cli`: the command's typed options and flags, and its entry point.
- :mod:`stagerl.study.common`: what the others share (the plan, rows, conditions, run summaries).
- :mod:`stagerl.study.report`: renders docs/results.md from a study's summary.
- :mod:`stagerl.study.figures`: the report's plots and sample grid.
- :mod:`stagerl.study.stats`: comparisons of rows over seeds.

Nothing is imported here, so importing one of these modules loads only it and what it imports
(:mod:`stagerl.cli` loads :mod:`stagerl.study.cli` when it builds its parser).
"""
