"""Quality/drift measures and the study at toy size: every row and seed
trained and evaluated, results.md + plots + grid written, reruns reuse everything, runs do not
depend on each other's order."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import stagerl.study.run as study_mod
from conftest import make_tiny_policy
from stagerl.cli import main
from stagerl.policies.tiny import TinyPolicy
from stagerl.quality import (cleanliness, code_histogram, encode_images, js_divergence,
                             kl_to_base, pretraining_code_histogram)
from stagerl.rewards.base import RewardOutput, register_reward
from stagerl.study.common import (CurvePoint, StudyPlan, StudyRun, StudySettings, StudySummary,
                                  _score_at_kl, frontier_levels, matched_kl)
from stagerl.worlds.shapes.prompts import generate


@register_reward("study_test_blue")
class _Blue:
    """Mean blue channel: continuous, so groups are never tied and every row moves."""

    name = "study_test_blue"

    def __call__(self, images, prompts, metadata):
        vals = [float(np.asarray(im, dtype=np.float32)[..., 2].mean() / 255.0) for im in images]
        return RewardOutput(torch.tensor(vals), torch.ones(len(vals), dtype=torch.bool))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """conftest's random-init tiny policy at the shapes canvas (8x8 tokens = 32 px)."""
    path = tmp_path_factory.mktemp("tiny8")
    make_tiny_policy(grid=8).save_pretrained(str(path))
    return path


# --------------------------------------------------------------------------------------------------
# Quality measures


def test_cleanliness_of_ground_truth_blank_and_noise():
    truth = [ex.image() for ex in generate(12, seed=3, split="test")]
    q = cleanliness(truth)
    assert q["fragments_per_image"] == 0 and q["speckle_px_per_image"] == 0
    assert q["clean_pixel_frac"] == 1.0 and q["empty_image_frac"] == 0
    blank = np.full((2, 32, 32, 3), 255, dtype=np.uint8)
    assert cleanliness(blank)["empty_image_frac"] == 1.0
    noise = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    qn = cleanliness(noise)
    assert qn["clean_pixel_frac"] < 0.2 and qn["offpalette_px_frac"] > 0.3
    # A ground-truth render with a stray blob: one more fragment, fewer clean pixels.
    dirty = next(t.copy() for t in truth
                 if (t[0:3, 0:10] == 255).all() and (t[31, 30:32] == 255).all())
    dirty[0:3, 0:10] = (0, 0, 255)  # a 10x3 blue bar is no shape: a fragment
    dirty[31, 30:32] = (255, 0, 0)  # 2 px: speckle the reward never sees
    qd = cleanliness([dirty])
    assert qd["fragments_per_image"] == 1 and qd["speckle_px_per_image"] == 2
    fg = int((dirty != 255).any(-1).sum())
    assert qd["clean_pixel_frac"] == pytest.approx((fg - 32) / fg)


def test_js_divergence_bounds():
    p = torch.tensor([1.0, 1.0, 0.0, 0.0])
    q = torch.tensor([0.0, 0.0, 2.0, 2.0])
    assert js_divergence(p, p) == pytest.approx(0.0, abs=1e-12)
    assert js_divergence(p, q) == pytest.approx(1.0)
    r = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert js_divergence(p, r) == pytest.approx(js_divergence(r, p))
    assert 0 < js_divergence(p, r) < 1


def test_token_drift_and_kl_on_a_tiny_policy():
    policy = make_tiny_policy(grid=8)
    tokens = torch.randint(0, policy.config.vocab_size, (6, 64), generator=torch.Generator()
                           .manual_seed(0))
    images = policy.decode(tokens)
    assert torch.equal(encode_images(policy, images), tokens)  # exact round trip
    hist, floor = pretraining_code_histogram(policy, n_examples=50, n_floor=50)
    assert hist.sum() == pytest.approx(1.0) and 0 <= floor < 0.2
    assert js_divergence(code_histogram(tokens, policy.config.vocab_size), hist) > floor
    prompts = [ex.prompt for ex in generate(6, seed=0, split="train")]
    same = kl_to_base(policy, policy, prompts, tokens)
    assert same["kl_k3"] == pytest.approx(0.0, abs=1e-6) and same["entropy"] > 0
    other = copy.deepcopy(policy)
    with torch.no_grad():
        other.head.weight.add_(0.5 * torch.randn_like(other.head.weight))
    moved = kl_to_base(other, policy, prompts, tokens, batch=4)  # batching must not matter
    assert moved["kl_k3"] > 1e-3
    assert moved["kl_k3"] == pytest.approx(kl_to_base(other, policy, prompts, tokens)["kl_k3"])


# --------------------------------------------------------------------------------------------------
# The study


def _args(model_dir, out, docs, *extra):
    return ["study", "--model", str(model_dir), "--out", str(out), "--docs", str(docs),
            "--steps", "2", "--eval-prompts", "6", "--eval-images", "1", "--curve-points", "1",
            "--set", "reward.names=[study_test_blue]", "sampling.prompts_per_step=2",
            "sampling.group_size=3", "optim.lr=0.05", *extra]


def test_toy_study_end_to_end_reuse_and_order_independence(tmp_path, model_dir, monkeypatch):
    out, docs = tmp_path / "study", tmp_path / "docs"
    assert main(_args(model_dir, out, docs, "--seeds", "2")) == 0
    text = (out / "summary.json").read_text()
    assert StudySummary.from_json(text).to_json() == text  # the typed form loses nothing
    summary = json.loads(text)
    runs = summary["runs"]
    assert sorted((r["row"], r["seed"]) for r in runs) == sorted(
        (row, s) for row in study_mod.ROWS for s in (0, 1))
    assert len({r["samples"] for r in runs}) == 1  # equal sample budget
    kls = [r["eval"]["quality"]["kl_k3"] for r in runs]
    assert max(kls) > 0 and summary["base"]["quality"]["kl_k3"] == pytest.approx(0, abs=1e-6)
    md = (docs / "results.md").read_text()
    for heading in ("## Findings", "`test`", "`compositions`", "`phrasings`",
                    "### Quality and drift", "## Training curves", "## Image grid",
                    "vanilla GRPO", "STAGE", "w/o Ent & KL", " ± ",
                    "Peer method: GCPO vs vanilla GRPO", "Peer method: Dr. GRPO vs vanilla GRPO"):
        assert heading in md, heading
    for name in ("reward", "heldout", "entropy", "kl", "grid"):
        assert (docs / f"results_{name}.png").stat().st_size > 1000

    # Rerun: every run, evaluation and grid comes from disk -- no training, no sampling.
    monkeypatch.setattr(study_mod, "train", lambda cfg: pytest.fail("retrained"))
    monkeypatch.setattr(TinyPolicy, "sample",
                        lambda *a, **k: pytest.fail("sampled on a rerun"))
    assert main(_args(model_dir, out, docs, "--seeds", "2")) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["reused_runs"] == len(runs)
    assert [r["eval"] for r in again["runs"]] == [r["eval"] for r in runs]
    monkeypatch.undo()

    # One run alone, in a fresh folder, gives the same model evaluation as inside the study.
    alone = tmp_path / "alone"
    assert main(_args(model_dir, alone, tmp_path / "docs2", "--seeds", "2", "--rows",
                      "stage")) == 0
    solo = {r["seed"]: r["eval"] for r in json.loads((alone / "summary.json").read_text())["runs"]}
    inside = {r["seed"]: r["eval"] for r in runs if r["row"] == "stage"}
    assert solo[1]["suites"] == inside[1]["suites"]
    assert solo[1]["quality"]["kl_k3"] == pytest.approx(inside[1]["quality"]["kl_k3"], rel=1e-5)


def test_plans_and_configs(tmp_path):
    quick, full = study_mod.StudyPlan.quick(), study_mod.StudyPlan()
    assert len(quick.seeds) >= 3 and len(full.seeds) >= 3 and quick.steps < 60
    cfgs = {row: study_mod.run_config(full, tmp_path, row, 0) for row in study_mod.ROWS}
    budgets = {(c.run.steps, c.sampling.prompts_per_step, c.sampling.group_size, c.optim.lr)
               for c in cfgs.values()}
    assert len(budgets) == 1  # rows differ only in the algorithm switches
    assert cfgs["stage"].algo.reweight and not cfgs["vanilla_grpo"].algo.reweight
    assert cfgs["wo_ent_kl"].algo.beta == 0 and cfgs["wo_ent_kl"].algo.entropy_reward == "off"
    long = study_mod.run_config(full, tmp_path, "stage", 0, "long")
    lr = study_mod.run_config(full, tmp_path, "stage", 0, lr_mult=4)
    assert long.run.steps == 3 * cfgs["stage"].run.steps
    assert lr.optim.lr == pytest.approx(4 * cfgs["stage"].optim.lr)
    assert lr.run.name == "stage-lr4-s0" and long.run.name == "stage-long-s0"
    assert study_mod.run_config(full, tmp_path, "vanilla_grpo", 0, "no_kl").algo.beta == 0
    lenient = study_mod.run_config(full, tmp_path, "plus_ent", 1, "lenient", 2.0)
    assert list(lenient.reward.names) == ["shapes_lenient"] and lenient.run.name == \
        "plus_ent-lenient-lr2-s1"
    assert lenient.optim.lr == pytest.approx(2 * cfgs["plus_ent"].optim.lr)
    norm = study_mod.run_config(full, tmp_path, "stage", 0, "token_norm")
    assert norm.algo.loss_agg == "token_mean" and cfgs["stage"].algo.loss_agg == \
        "group_weighted_mean"
    # Jobs: each run once, compared rows first; an aggregation-only condition retrains STAGE only.
    plan = study_mod.StudyPlan(conditions=["lenient", "token_norm"], lr_sweep=[2.0, 4.0])
    jobs = study_mod.plan_jobs(plan)
    names = [j.name for j in jobs]
    assert len(names) == len(set(names)) == 9 + 9 + 3 + 18 + 12
    assert names[:9] == [f"{r}-s{s}" for s in range(3) for r in study_mod.COMPARE_ROWS]
    assert [n for n in names if "token_norm" in n] == [f"stage-token_norm-s{s}" for s in range(3)]
    assert names[-12:] == [f"{r}-s{s}" for s in range(3)
                           for r in ("wo_kl", "wo_ent_kl", "gcpo", "dr_grpo")]
    # A shorter sweep has its own x1 runs; the main runs stay as they are.
    short = study_mod.plan_jobs(study_mod.StudyPlan(rows=["stage"], compare_rows=["stage"],
                                                    lr_sweep=[2.0], sweep_steps=24, seeds=[0]))
    assert [j.name for j in short] == ["stage-s0", "stage-lr1-24st-s0", "stage-lr2-24st-s0"]
    cfg24 = study_mod.run_config(full, tmp_path, "stage", 0, None, 2.0, 24)
    assert cfg24.run.steps == 24 and cfg24.run.name == "stage-lr2-24st-s0"
    with pytest.raises(Exception, match="sweep in main"):
        study_mod.plan_jobs(study_mod.StudyPlan(conditions=["token_norm"], lr_sweep=[2.0],
                                                sweep_in=["token_norm"]))
    with pytest.raises(Exception, match="no config for row"):
        study_mod.run_config(full, tmp_path, "nope", 0)
    assert main(["study", "--rows", "nope", "--out", str(tmp_path)]) == 2


def test_a_run_is_reused_when_only_new_or_removed_fields_differ(tmp_path):
    from omegaconf import OmegaConf

    from stagerl.config import to_yaml

    cfg = study_mod.run_config(study_mod.StudyPlan(), tmp_path, "stage", 0)
    resolved = OmegaConf.to_container(OmegaConf.create(to_yaml(cfg)))
    assert study_mod._same_run({"resolved": resolved}, cfg)
    older = copy.deepcopy(resolved)
    del older["model"]["dtype"]  # a field the config gained since the run was trained
    older["algo"]["gone"] = 1  # a field it lost
    assert study_mod._same_run({"resolved": older}, cfg)
    older["run"]["out_dir"] = "/elsewhere/runs"  # the same study reached by another path
    assert study_mod._same_run({"resolved": older}, cfg)
    older["optim"]["lr"] = 2 * cfg.optim.lr  # a field both know, with another value
    assert not study_mod._same_run({"resolved": older}, cfg)


def _run(kls, scores, **fields):
    """A StudyRun with only what the frontier helpers read: its in-training curve."""
    curve = [CurvePoint(step=10 * i, heldout=s, heldout_lenient=s, kl=k)
             for i, (k, s) in enumerate(zip(kls, scores))]
    return StudyRun(**{"row": "stage", "seed": 0, "run_dir": "runs/stage-s0", "train_seconds": 1.0,
                       "reused": False, "eval": {}, "curve": curve, "steps": 20, "samples": 120,
                       "lr": 1e-4, "beta": 0.03, "reward": ["shapes_strict"], **fields})


def test_frontier_helpers_interpolate_at_matched_kl():
    run = _run
    r = run([0.0, 0.02, 0.04], [0.5, 0.6, 0.8])
    assert _score_at_kl(r.curve, 0.01) == pytest.approx(0.55)
    assert _score_at_kl(r.curve, 0.03) == pytest.approx(0.7)
    assert _score_at_kl(r.curve, 0.05) is None  # never reached
    # Not monotone: the first crossing counts.
    assert _score_at_kl(run([0.0, 0.04, 0.02], [0.5, 0.9, 0.1]).curve, 0.02) == \
        pytest.approx(0.7)
    by_row = {"vanilla_grpo": {1.0: [run([0, 0.02, 0.04], [0.5, 0.6, 0.7])] * 2,
                               2.0: [run([0, 0.04, 0.08], [0.5, 0.6, 0.9])] * 2},
              "stage": {1.0: [run([0, 0.01, 0.02], [0.5, 0.7, 0.8])] * 2,
                        2.0: [run([0, 0.02, 0.06], [0.5, 0.85, 0.6])] * 2}}
    # STAGE's lr x2 seeds reach 0.06, vanilla's lr x2 reach 0.08: the levels stop at 0.06.
    assert frontier_levels(by_row) == pytest.approx([0.00375, 0.0075, 0.015, 0.03, 0.06])
    got = matched_kl(by_row, 0.02)
    assert got["vanilla_grpo"][0] == 1.0 and got["vanilla_grpo"][1] == pytest.approx([0.6, 0.6])
    assert got["stage"][0] == 2.0 and got["stage"][1] == pytest.approx([0.85, 0.85])


def test_peer_rows_are_read_at_matched_kl_along_the_main_curves():
    from stagerl.study.report import curve_matched_kl_section
    runs = [_run([0, 0.02, 0.04], [0.5, 0.6, 0.7], row="vanilla_grpo", seed=s) for s in (0, 1)]
    runs += [_run([0, 0.01, 0.02], [0.5, 0.7, 0.9], row="gcpo", seed=s) for s in (0, 1)]
    runs += [_run([0, 0.08, 0.1], [0.5, 0.9, 0.9], row="gcpo", lr_mult=2.0)]  # a sweep run: out
    summary = StudySummary(plan=StudyPlan(rows=["vanilla_grpo", "gcpo"]), base=_EVAL, runs=runs,
                           config=StudySettings(P=2, G=3, lr=1e-4, beta=0.03, cfg_scale=2.0,
                                                steps=20), wall_seconds=5.0, train_seconds=2.0,
                           reused_runs=0, shard=None)
    text = "\n".join(curve_matched_kl_section(summary))
    # GCPO's seeds reach KL 0.02 only, so the top level is 0.02: 0.9 vs vanilla's 0.6 there.
    top = next(line for line in text.splitlines() if "KL 0.0200" in line)
    assert "0.900" in top and "0.600" in top and "(better)" in top
    assert "no learning-rate sweep" in text
    without = StudySummary(**{**summary.__dict__,
                              "plan": StudyPlan(rows=["vanilla_grpo", "stage"])})
    assert curve_matched_kl_section(without) == []  # no peer row, no section


# --------------------------------------------------------------------------------------------------
# The summary: dataclasses in memory, the same JSON on disk


_EVAL = {"key": "0123456789abcdef",
         "suites": {"test": {"suite": "test", "prompts": 2, "images_per_prompt": 1,
                             "cfg_scale": 2.0, "seed": 1234,
                             "strict": {"counting": 0.5, "overall": 0.5},
                             "lenient": {"counting": 1.0, "overall": 1.0}, "partial": 0.75}},
         "quality": {"kl_k3": 0.01, "entropy": 2.5, "base_entropy": 2.6, "code_jsd_floor": 0.02}}


def _disk_summary() -> dict:
    """summary.json as `stagerl study` writes it: every key, in its order, at toy size."""
    plan = {"rows": ["vanilla_grpo", "stage"], "seeds": [0], "steps": 2, "overrides": [],
            "model": "builtin:shapes", "config_dir": "configs/ablations", "eval_prompts": 2,
            "eval_images": 1, "curve_suite": "phrasings", "curve_points": 1, "curve_prompts": 2,
            "curve_images": 1, "quality_ref_examples": 10, "grid_prompts": 2, "grid_images": 1,
            "conditions": ["lenient"], "condition_seeds": 1,
            "compare_rows": ["vanilla_grpo", "stage"], "lr_sweep": [2.0], "sweep_in": ["main"],
            "sweep_seeds": 1, "sweep_steps": 0}

    def run(row, condition, lr_mult, kl):
        return {"row": row, "seed": 0, "condition": condition, "lr_mult": lr_mult,
                "job_steps": 0, "run_dir": f"runs/study/runs/{row}-s0", "train_seconds": 3.5,
                "reused": True, "eval": _EVAL,
                "curve": [{"step": 0, "heldout": 0.4, "heldout_lenient": 0.5, "kl": 0.0,
                           "kl_seq": 0.0, "proxy": 0.3},
                          {"step": 2, "heldout": 0.6, "heldout_lenient": 0.7, "kl": kl,
                           "kl_seq": 64 * kl, "proxy": 0.5}],
                "steps": 2, "samples": 12, "lr": 1e-4 * lr_mult, "beta": 0.03,
                "reward": ["shapes_strict"]}

    return {"plan": plan, "base": _EVAL,
            "runs": [run("vanilla_grpo", None, 1.0, 0.02), run("stage", "lenient", 1.0, 0.01),
                     run("stage", None, 2.0, 0.03)],
            "config": {"P": 2, "G": 3, "lr": 1e-4, "beta": 0.03, "cfg_scale": 2.0, "steps": 2},
            "wall_seconds": 60.0, "train_seconds": 10.5, "reused_runs": 3, "shard": None}


def test_summary_loads_the_on_disk_format():
    d = _disk_summary()
    s = StudySummary.from_dict(copy.deepcopy(d))
    assert s.plan == StudyPlan(**d["plan"]) and s.config.P == 2 and s.config.cfg_scale == 2.0
    assert [(r.row, r.condition, r.lr_mult) for r in s.runs] == [
        ("vanilla_grpo", None, 1.0), ("stage", "lenient", 1.0), ("stage", None, 2.0)]
    assert s.runs[1].curve[1] == CurvePoint(step=2, heldout=0.6, heldout_lenient=0.7, kl=0.01,
                                            kl_seq=0.64, proxy=0.5)
    assert s.base == _EVAL and s.runs[0].eval == _EVAL  # the evaluation payload stays a dict
    assert [r.at_plan_lr_and_steps for r in s.runs] == [True, True, False]
    assert s.shard is None and s.reused_runs == 3
    assert s.to_dict() == d  # the same keys and values back
    assert s.to_json() == json.dumps(d, indent=1)  # and the same file, key order included
    # A file from before lr_mult, job_steps and curve existed, with a key since removed.
    old = copy.deepcopy(d)
    for r in old["runs"]:
        del r["lr_mult"], r["job_steps"], r["curve"]
        r["gone"] = 1
    old["shard"] = [0, 2]
    s_old = StudySummary.from_dict(old)
    assert all(r.lr_mult == 1.0 and r.job_steps == 0 and r.curve == [] for r in s_old.runs)
    assert s_old.shard == (0, 2)
    # curve points from before the over-optimisation study: no whole-image KL, no proxy score
    older = copy.deepcopy(d)
    for r in older["runs"]:
        for p in r["curve"]:
            del p["kl_seq"], p["proxy"]
    point = StudySummary.from_dict(older).runs[1].curve[1]
    assert point.kl == 0.01 and math.isnan(point.kl_seq) and math.isnan(point.proxy)


def test_summary_round_trips_through_json():
    runs = [_run([0.0, 0.02], [0.5, 0.6], condition="lenient"),
            _run([0.0, float("nan")], [0.5, 0.7], row="wo_ent_kl", lr_mult=2.0, job_steps=24)]
    s = StudySummary(plan=StudyPlan(lr_sweep=[2.0], sweep_steps=24), base=_EVAL, runs=runs,
                     config=StudySettings(P=2, G=3, lr=1e-4, beta=0.03, cfg_scale=2.0, steps=20),
                     wall_seconds=5.0, train_seconds=2.0, reused_runs=0, shard=(1, 2))
    back = StudySummary.from_json(s.to_json())
    assert math.isnan(back.runs[1].curve[1].kl)  # rows without a reference log no KL
    back.runs[1].curve[1].kl = s.runs[1].curve[1].kl = 0.0  # NaN != NaN; the rest must be equal
    for summary in (s, back):  # runs on an exact reward have no proxy score (NaN) either
        for r in summary.runs:
            for p in r.curve:
                assert math.isnan(p.proxy) and math.isnan(p.kl_seq)
                p.proxy = p.kl_seq = 0.0
    assert back == s and isinstance(back.shard, tuple)


def test_conditions_sweep_frontier_shards_and_jobs(tmp_path, model_dir, monkeypatch):
    out, docs = tmp_path / "study", tmp_path / "docs"
    extra = ["--rows", "vanilla_grpo,plus_ent,stage", "--seeds", "2", "--conditions",
             "lenient,token_norm", "--lr-sweep", "2", "--sweep-seeds", "1"]
    # Two shards split the runs and write no report; the full invocation then trains nothing.
    for shard in ("0/2", "1/2"):
        assert main(_args(model_dir, out, docs, *extra, "--shard", shard)) == 0
    assert not (out / "summary.json").exists() and not docs.exists()
    monkeypatch.setattr(study_mod, "train", lambda cfg: pytest.fail("retrained"))
    assert main(_args(model_dir, out, docs, *extra)) == 0
    monkeypatch.undo()
    summary = json.loads((out / "summary.json").read_text())
    names = sorted(Path(r["run_dir"]).name for r in summary["runs"])
    assert names == sorted([f"{r}-s{s}" for r in study_mod.COMPARE_ROWS for s in (0, 1)]
                           + [f"{r}-lenient-s{s}" for r in study_mod.COMPARE_ROWS for s in (0, 1)]
                           + [f"stage-token_norm-s{s}" for s in (0, 1)]
                           + [f"{r}-lr2-s0" for r in study_mod.COMPARE_ROWS])
    for r in summary["runs"]:  # before, one in-run evaluation, after; KL 0 at the start
        assert [p["step"] for p in r["curve"]] == [0, 1, 2] and r["curve"][0]["kl"] == 0
        assert all(p["kl"] >= 0 for p in r["curve"])
    md = (docs / "results.md").read_text()
    for heading in ("## Drift setting `lenient`", "vanilla GRPO − base model",
                    "## Learning-rate sweep and the reward-KL frontier", "lr x2",
                    "at matched KL", "token_norm", "STAGE − vanilla GRPO per condition"):
        assert heading in md, heading
    assert (docs / "results_frontier.png").stat().st_size > 1000
    assert "--lr-sweep 2" in md and "--shard" not in md


def test_jobs_run_in_worker_processes(tmp_path, model_dir, monkeypatch):
    out = tmp_path / "study"
    args = ["study", "--model", str(model_dir), "--out", str(out), "--docs", str(tmp_path / "d"),
            "--steps", "1", "--eval-prompts", "2", "--eval-images", "1", "--curve-points", "0",
            "--set", "sampling.prompts_per_step=2", "sampling.group_size=2", "--rows", "stage",
            "--compare-rows", "stage", "--seeds", "2"]
    assert main([*args, "--jobs", "2"]) == 0
    first = json.loads((out / "summary.json").read_text())
    assert sorted(r["seed"] for r in first["runs"]) == [0, 1]
    monkeypatch.setattr(study_mod, "train", lambda cfg: pytest.fail("retrained"))
    assert main(args) == 0
    again = json.loads((out / "summary.json").read_text())
    assert [r["eval"] for r in again["runs"]] == [r["eval"] for r in first["runs"]]


def test_grid_cache_follows_the_weights(tmp_path):
    """A retrained run must not show the images cached for the run it replaced."""
    from stagerl.study.figures import _weights_tag

    (tmp_path / "model.safetensors").write_bytes(b"one")
    first = _weights_tag(str(tmp_path))
    assert first == _weights_tag(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"two")
    assert _weights_tag(str(tmp_path)) != first
    assert _weights_tag("builtin:shapes").startswith("weights-")  # the shipped model's weights
