"""Reward over-optimisation against a learned proxy, measured with the exact evaluator as gold.

The method is Gao, Schulman and Hilton's ("Scaling Laws for Reward Model Overoptimization",
arXiv 2210.10760): optimise a learned proxy, score the same policy with a gold reward, and read both
against d = sqrt(KL(pi || pi_init)). For RL they found the gold gain over the initial policy
follows gold(d) = d (alpha - beta ln d): it rises, peaks at d* = exp(alpha / beta - 1) with gain
beta d*, then falls while the proxy keeps rising.

Here, per run of ``stagerl study --proxy NAME`` (docs/study.md, "Reward over-optimisation"):
- each in-training evaluation (a :class:`CurvePoint`) gives gold strict and lenient and the
  proxy's score on the same held-out images, and the training KL of a whole image to the base
  (the sum of its 64 tokens' k3 KLs, averaged around that step); d = sqrt of that KL;
- :func:`fit_gold` fits alpha and beta to the gold gain by least squares (the model is linear in
  them); the peak is read both from the fit and from the evaluations themselves.
:func:`analyse` turns a study summary into per-method numbers with their seed spread;
:mod:`stagerl.study.overopt_report` writes the page and figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from stagerl.study.common import CurvePoint, StudyRun, StudySummary, first_reach
from stagerl.study.stats import stats

# The four rows the over-optimisation study trains (docs/study.md): the two with a KL term, the
# entropy reward alone, and STAGE without its KL term (what reweighting alone does to hacking).
OVEROPT_ROWS = ("vanilla_grpo", "plus_ent", "stage", "wo_kl")
# A run has over-optimised when its smoothed gold score (the mean of SMOOTH consecutive
# evaluations, which cuts a 192-image evaluation's standard error of ~0.036 to ~0.02) ends more
# than DROP below its smoothed peak while the smoothed proxy did not fall.
DROP = 0.07
SMOOTH = 3


def smoothed(x: np.ndarray, k: int = SMOOTH) -> np.ndarray:
    """Centred moving average over k evaluations (fewer at the ends) [P] -> [P]."""
    h = k // 2
    return np.array([x[max(0, i - h):i + h + 1].mean() for i in range(len(x))])


@dataclass
class GoldFit:
    """gold(d) - gold(0) = d (alpha - beta ln d), fitted by least squares."""

    alpha: float
    beta: float

    @property
    def d_peak(self) -> float:
        """argmax of the fitted gain; inf when the fit never turns over (beta <= 0)."""
        return math.exp(self.alpha / self.beta - 1.0) if self.beta > 0 else math.inf

    @property
    def gain_peak(self) -> float:
        return self.beta * self.d_peak if self.beta > 0 else math.inf

    def gain(self, d: np.ndarray) -> np.ndarray:
        d = np.asarray(d, dtype=float)
        safe = np.where(d > 0, d, 1.0)
        return np.where(d > 0, d * (self.alpha - self.beta * np.log(safe)), 0.0)


def fit_gold(d: np.ndarray, gain: np.ndarray) -> GoldFit | None:
    """Least-squares alpha, beta of gain = alpha d - beta d ln d over the points with d > 0;
    None with fewer than two such points."""
    d, gain = np.asarray(d, float), np.asarray(gain, float)
    ok = (d > 0) & np.isfinite(d) & np.isfinite(gain)
    if ok.sum() < 2:
        return None
    a = np.stack([d[ok], -d[ok] * np.log(d[ok])], axis=1)  # [n, 2]
    (alpha, beta), *_ = np.linalg.lstsq(a, gain[ok], rcond=None)
    return GoldFit(float(alpha), float(beta))


@dataclass
class RunOveropt:
    """One run's gold/proxy trajectory and what it shows."""

    run: StudyRun
    steps: np.ndarray  # [P] evaluation steps, 0 = the base model
    d: np.ndarray  # [P] sqrt(KL of an image to the base)
    gold: np.ndarray  # [P] gold strict (held-out overall)
    lenient: np.ndarray  # [P] gold lenient
    proxy: np.ndarray  # [P] proxy score on the same images
    fit: GoldFit | None
    peak: int  # index of the highest smoothed gold

    @property
    def gold_s(self) -> np.ndarray:
        return smoothed(self.gold)

    @property
    def drop(self) -> float:
        """Smoothed gold at the peak minus smoothed gold at the end."""
        return float(self.gold_s[self.peak] - self.gold_s[-1])

    @property
    def overoptimised(self) -> bool:
        """Smoothed gold fell by more than DROP from its peak to the end while the smoothed proxy
        did not fall."""
        proxy_s = smoothed(self.proxy)
        return bool(self.drop > DROP and proxy_s[-1] >= proxy_s[self.peak] - 1e-9)

    @property
    def fit_kl_peak(self) -> float:
        """KL at the fitted peak when the fit turns over within the run's KL range, else inf."""
        if self.fit is None or not self.fit.d_peak <= float(self.d.max()):
            return math.inf
        return self.fit.d_peak ** 2


def run_overopt(run: StudyRun) -> RunOveropt | None:
    """The trajectory of a run trained on a proxy; None for a run without proxy scores."""
    pts: list[CurvePoint] = [p for p in run.curve if math.isfinite(p.proxy)]
    if len(pts) < 3:
        return None
    steps = np.array([p.step for p in pts])
    kl = np.array([max(0.0, p.kl_seq) for p in pts])
    gold = np.array([p.heldout for p in pts])
    d = np.sqrt(kl)
    fit = fit_gold(d, gold - gold[0])
    return RunOveropt(run, steps, d, gold, np.array([p.heldout_lenient for p in pts]),
                      np.array([p.proxy for p in pts]), fit, int(np.argmax(smoothed(gold))))


def _at_level(x: np.ndarray, y: np.ndarray, level: float) -> float:
    """y where x first reaches ``level`` (linear between points); NaN when it never does."""
    v = first_reach(list(x), list(y), level)
    return float("nan") if v is None else float(v)


@dataclass
class MethodOveropt:
    """Per-method numbers, one value per seed (:func:`stagerl.study.stats.stats` summarises
    them)."""

    row: str
    runs: list[RunOveropt]
    peak_gold: list[float] = field(default_factory=list)  # smoothed
    drop: list[float] = field(default_factory=list)  # smoothed peak - smoothed end
    peak_step: list[float] = field(default_factory=list)
    kl_at_peak: list[float] = field(default_factory=list)
    alpha: list[float] = field(default_factory=list)
    beta: list[float] = field(default_factory=list)
    fit_kl_peak: list[float] = field(default_factory=list)  # d*^2 of the fit, inf beyond the run
    final_gold: list[float] = field(default_factory=list)
    final_lenient: list[float] = field(default_factory=list)
    final_proxy: list[float] = field(default_factory=list)
    final_kl: list[float] = field(default_factory=list)
    overoptimised: int = 0
    at_proxy: dict[float, list[float]] = field(default_factory=dict)  # gold at matched proxy
    at_kl: dict[float, list[float]] = field(default_factory=dict)  # gold at matched KL
    quality: dict[str, list[float]] = field(default_factory=dict)  # end-of-run measures


QUALITY_KEYS = ("fragments_per_image", "clean_pixel_frac", "code_jsd", "diversity_code_distance",
                "diversity_distinct_frac")


def matched_levels(per_run: list[np.ndarray], base: float, n: int = 4) -> list[float]:
    """``n`` evenly spaced levels from ``base`` up to the highest value every run reaches."""
    top = min(float(np.max(v)) for v in per_run)
    if not top > base:
        return []
    return [base + (top - base) * (k + 1) / n for k in range(n)]


def analyse(summary: StudySummary) -> tuple[dict[str, MethodOveropt], dict[str, list[float]]]:
    """Per method (in OVEROPT_ROWS order, then any other row): the numbers of the page; and the
    matched levels used: {"proxy": [...], "kl": [...]}."""
    by_row: dict[str, list[RunOveropt]] = {}
    for r in summary.runs:
        ro = run_overopt(r)
        if ro is not None:
            by_row.setdefault(r.row, []).append(ro)
    order = [r for r in OVEROPT_ROWS if r in by_row] + [r for r in by_row if r not in OVEROPT_ROWS]
    all_runs = [ro for row in order for ro in by_row[row]]
    levels = {"proxy": [], "kl": []}
    if all_runs:
        levels["proxy"] = matched_levels([ro.proxy for ro in all_runs],
                                         float(np.mean([ro.proxy[0] for ro in all_runs])))
        levels["kl"] = matched_levels([ro.d ** 2 for ro in all_runs], 0.0)
    out = {}
    for row in order:
        m = MethodOveropt(row, by_row[row])
        for ro in m.runs:
            m.peak_gold.append(float(ro.gold_s[ro.peak]))
            m.drop.append(ro.drop)
            m.peak_step.append(float(ro.steps[ro.peak]))
            m.kl_at_peak.append(float(ro.d[ro.peak] ** 2))
            m.final_gold.append(float(ro.gold_s[-1]))
            m.final_lenient.append(float(smoothed(ro.lenient)[-1]))
            m.final_proxy.append(float(smoothed(ro.proxy)[-1]))
            m.final_kl.append(float(ro.d[-1] ** 2))
            m.overoptimised += int(ro.overoptimised)
            if ro.fit is not None:
                m.alpha.append(ro.fit.alpha)
                m.beta.append(ro.fit.beta)
                m.fit_kl_peak.append(ro.fit_kl_peak)
            for lv in levels["proxy"]:
                m.at_proxy.setdefault(lv, []).append(_at_level(ro.proxy, ro.gold, lv))
            for lv in levels["kl"]:
                m.at_kl.setdefault(lv, []).append(_at_level(ro.d ** 2, ro.gold, lv))
            q = ro.run.eval.get("quality", {}) if isinstance(ro.run.eval, dict) else {}
            for k in QUALITY_KEYS:
                if k in q:
                    m.quality.setdefault(k, []).append(float(q[k]))
        out[row] = m
    return out, levels


def paired_difference(a: MethodOveropt, b: MethodOveropt, what: str) -> tuple[float, float, int]:
    """Mean and std over shared seeds of a's value minus b's (``what``: a list field)."""
    va = {ro.run.seed: v for ro, v in zip(a.runs, getattr(a, what))}
    vb = {ro.run.seed: v for ro, v in zip(b.runs, getattr(b, what))}
    return stats([va[s] - vb[s] for s in sorted(va.keys() & vb.keys())])
