"""The over-optimisation study's analysis (study/overopt.py) and page (study/overopt_report.py):
the gold(d) fit recovers known curves, the peak and over-optimisation are read from the
evaluations, matched levels interpolate, the results.md block is inserted once and survives the
main report, and ``stagerl study --proxy`` plans and refuses like the rest of the CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stagerl.errors import UserError
from stagerl.study.common import CurvePoint, StudyPlan, StudyRun, StudySettings, StudySummary
from stagerl.study.overopt import (DROP, GoldFit, _at_level, analyse, fit_gold, run_overopt,
                                   smoothed)
from stagerl.study.overopt_report import BLOCK_START, insert_block, write_overopt_report


def test_fit_recovers_alpha_beta_and_the_peak():
    d = np.linspace(0.1, 6.0, 25)
    truth = GoldFit(alpha=0.3, beta=0.2)
    fit = fit_gold(d, truth.gain(d))
    assert fit.alpha == pytest.approx(0.3, abs=1e-9) and fit.beta == pytest.approx(0.2, abs=1e-9)
    assert fit.d_peak == pytest.approx(math.exp(0.3 / 0.2 - 1))
    # the gain's maximum over a fine grid is where the closed form says
    grid = np.linspace(0.01, 10, 100000)
    assert grid[np.argmax(truth.gain(grid))] == pytest.approx(truth.d_peak, rel=1e-3)
    assert truth.gain_peak == pytest.approx(truth.gain(np.array([truth.d_peak]))[0])
    # never turns over: beta <= 0 means no finite peak
    assert GoldFit(0.1, -0.05).d_peak == math.inf
    assert fit_gold(np.array([0.0, 1.0]), np.array([0.0, 0.1])) is None


def _run(row: str, seed: int, gold: list[float], proxy: list[float], kl: list[float],
         quality: dict | None = None) -> StudyRun:
    curve = [CurvePoint(step=10 * i, heldout=g, heldout_lenient=g + 0.05, kl=k / 64, kl_seq=k,
                        proxy=p) for i, (g, p, k) in enumerate(zip(gold, proxy, kl))]
    return StudyRun(row=row, seed=seed, run_dir="/nonexistent", train_seconds=1.0, reused=False,
                    eval={"quality": quality or {}}, curve=curve, steps=10 * (len(gold) - 1),
                    samples=1, lr=1e-4, beta=0.03, reward=["shapes_detector"])


KL = [0.0, 1.0, 4.0, 9.0, 16.0, 25.0]


def test_peak_and_over_optimisation_are_read_from_the_evaluations():
    hacked = run_overopt(_run("vanilla_grpo", 0, [0.5, 0.6, 0.7, 0.6, 0.5, 0.4],
                              [0.5, 0.65, 0.75, 0.8, 0.85, 0.9], KL))
    assert hacked.peak == 2 and hacked.overoptimised
    assert hacked.fit is not None and hacked.fit.beta > 0 and 1.0 < hacked.fit.d_peak < 5.0
    # gold falls but so does the proxy: a divergence, not over-optimisation
    diverged = run_overopt(_run("plus_ent", 0, [0.5, 0.6, 0.7, 0.6, 0.5, 0.4],
                                [0.5, 0.65, 0.75, 0.6, 0.5, 0.4], KL))
    assert not diverged.overoptimised
    rising = run_overopt(_run("stage", 0, [0.5, 0.55, 0.6, 0.65, 0.7, 0.72],
                              [0.5, 0.6, 0.7, 0.8, 0.85, 0.9], KL))
    assert not rising.overoptimised and rising.peak == 5
    # a run trained on an exact reward has no proxy scores
    assert run_overopt(_run("stage", 0, [0.5] * 6, [float("nan")] * 6, KL)) is None


def test_the_criterion_rarely_flags_noise_and_finds_a_real_drop():
    """15 evaluations with a 192-image evaluation's noise (sd 0.036): a flat gold curve is rarely
    called over-optimised, a gold curve that falls by 0.15 after its peak nearly always is."""
    rng = np.random.default_rng(0)
    steps = 15
    kl = list(np.linspace(0, 9, steps))
    proxy = list(np.linspace(0.5, 0.85, steps))
    shape = np.concatenate([np.linspace(0.5, 0.62, 6), np.linspace(0.62, 0.47, steps - 6)])
    flat = sum(run_overopt(_run("vanilla_grpo", 0, list(0.58 + rng.normal(0, 0.036, steps)),
                                proxy, kl)).overoptimised for _ in range(300)) / 300
    real = sum(run_overopt(_run("vanilla_grpo", 0, list(shape + rng.normal(0, 0.036, steps)),
                                proxy, kl)).overoptimised for _ in range(300)) / 300
    assert flat < 0.1 and real > 0.9, (flat, real)
    assert smoothed(np.array([0.0, 3.0, 0.0, 3.0])).tolist() == [1.5, 1.0, 2.0, 1.5]
    assert DROP > 0


def test_matched_levels_and_per_method_spread():
    assert _at_level(np.array([0.0, 1.0, 2.0]), np.array([0.0, 10.0, 30.0]), 1.5) == 20.0
    assert math.isnan(_at_level(np.array([0.0, 1.0]), np.array([0.0, 1.0]), 2.0))
    runs = [_run("vanilla_grpo", s, [0.5, 0.6, 0.7, 0.6, 0.5, 0.4 + 0.01 * s],
                 [0.5, 0.65, 0.75, 0.8, 0.85, 0.9], KL, {"code_jsd": 0.1 * s})
            for s in range(3)]
    runs += [_run("stage", s, [0.5, 0.55, 0.6, 0.65, 0.7, 0.72],
                  [0.5, 0.6, 0.7, 0.8, 0.85, 0.9], KL) for s in range(3)]
    summary = StudySummary(plan=StudyPlan(), base=None, runs=runs,
                           config=StudySettings(8, 8, 1e-4, 0.03, 2.0, 50), wall_seconds=1,
                           train_seconds=1, reused_runs=0)
    methods, levels = analyse(summary)
    assert list(methods) == ["vanilla_grpo", "stage"]
    v = methods["vanilla_grpo"]
    # peaks are read on gold smoothed over 3 evaluations: (0.6 + 0.7 + 0.6) / 3 at KL 4
    assert v.overoptimised == 3 and v.kl_at_peak == [4.0] * 3
    assert v.peak_gold == pytest.approx([0.6333333] * 3)
    assert v.quality["code_jsd"] == pytest.approx([0.0, 0.1, 0.2])
    assert len(levels["proxy"]) == 4 and levels["proxy"][-1] == pytest.approx(0.9)
    # at KL 25 (the last level) vanilla's gold is ~0.41, STAGE's 0.72
    assert methods["stage"].at_kl[levels["kl"][-1]] == pytest.approx([0.72] * 3)
    assert np.mean(v.at_kl[levels["kl"][-1]]) == pytest.approx(0.41)


def test_the_results_block_is_inserted_once_and_replaced(tmp_path):
    page = tmp_path / "results.md"
    page.write_text("# Results\n\nold body\n")
    insert_block(page, "first")
    insert_block(page, "second")
    text = page.read_text()
    assert text.count(BLOCK_START) == 1 and "second" in text and "first" not in text
    assert text.startswith("# Results\n") and text.index("second") < text.index("old body")


def test_the_main_report_keeps_the_block(tmp_path, monkeypatch):
    from stagerl.study import figures

    page = tmp_path / "results.md"
    page.write_text("# Results\n\nold\n")
    insert_block(page, "the over-optimisation block")
    monkeypatch.setattr(figures, "write_plots", lambda *a: {})
    monkeypatch.setattr(figures, "write_frontiers", lambda *a: {})
    monkeypatch.setattr(figures, "write_drift_curves", lambda *a: {})
    monkeypatch.setattr(figures, "write_grid", lambda *a: None)
    monkeypatch.setattr(figures, "render_markdown", lambda *a: "# Results\n\nnew body\n")
    figures.write_report(None, tmp_path, tmp_path, "cmd")
    text = page.read_text()
    assert "new body" in text and "the over-optimisation block" in text and "old" not in text


def test_report_without_proxy_runs_writes_nothing(tmp_path):
    summary = StudySummary(plan=StudyPlan(), base=None,
                           runs=[_run("stage", 0, [0.5] * 6, [float("nan")] * 6, KL)],
                           config=StudySettings(8, 8, 1e-4, 0.03, 2.0, 50), wall_seconds=1,
                           train_seconds=1, reused_runs=0)
    assert write_overopt_report(summary, tmp_path, "cmd") == []


def test_study_proxy_plan_and_refusals(tmp_path):
    import argparse

    from stagerl.study.cli import add_cli_args, plan_from_options, options

    parser = argparse.ArgumentParser()
    add_cli_args(parser)

    def plan(*argv):
        opts = options(parser.parse_args(["--out", str(tmp_path / "o"), "--docs",
                                          str(tmp_path / "d"), *argv]))
        return plan_from_options(opts), opts

    p, opts = plan("--proxy", "shapes_detector")
    assert p.rows == ["vanilla_grpo", "plus_ent", "stage", "wo_kl"] and p.steps == 200
    assert p.curve_suite == "heldout" and opts.prefix == "results_overopt"
    assert p.overrides[0] == "reward.names=[shapes_detector]"
    with pytest.raises(UserError, match="--proxy: unknown proxy reward 'shapes_detecter'"):
        plan("--proxy", "shapes_detecter")
    with pytest.raises(UserError, match="is not a proxy reward"):
        (tmp_path / "notproxy").mkdir()
        plan("--proxy", "shapes_scorer", "--proxy-weights", str(tmp_path / "notproxy"))
    with pytest.raises(UserError, match="holds a detector proxy"):
        plan("--proxy", "shapes_scorer", "--proxy-weights", "builtin:shapes_detector")


def test_study_proxy_end_to_end(tmp_path):
    """A tiny over-optimisation study: every evaluation carries gold, proxy and whole-image KL,
    and the page, its figure and the results.md block are written."""
    import json

    from stagerl.cli import main

    out, docs = tmp_path / "o", tmp_path / "docs"
    docs.mkdir()
    (docs / "results.md").write_text("# Results\n\nbody\n")
    assert main(["study", "--proxy", "shapes_detector", "--out", str(out), "--docs", str(docs),
                 "--seeds", "1", "--rows", "vanilla_grpo", "--steps", "4", "--eval-prompts", "6",
                 "--eval-images", "2", "--curve-points", "1", "--curve-prompts", "6", "--set",
                 "sampling.prompts_per_step=2", "sampling.group_size=3"]) == 0
    run = json.loads((out / "summary.json").read_text())["runs"][0]
    assert run["reward"] == ["shapes_detector"] and [p["step"] for p in run["curve"]] == [0, 2, 4]
    assert all(0 <= p["proxy"] <= 1 for p in run["curve"])
    assert run["curve"][0]["kl_seq"] == 0 and run["curve"][-1]["kl_seq"] > 0
    page = (docs / "results_overopt.md").read_text()
    assert "| vanilla GRPO | 0/1 |" in page or "| vanilla GRPO | 1/1 |" in page
    assert (docs / "results_overopt_gold_proxy.png").stat().st_size > 1000
    text = (docs / "results.md").read_text()
    assert text.index(BLOCK_START) < text.index("body")
    # a study of another proxy under its own prefix keeps its own page and leaves the block alone
    from stagerl.study.common import StudySummary as Summary

    summary = Summary.from_json((out / "summary.json").read_text())
    write_overopt_report(summary, docs, "cmd", prefix="results_overopt_other")
    assert (docs / "results_overopt_other.md").is_file()
    assert (docs / "results.md").read_text() == text
