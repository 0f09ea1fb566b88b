"""Seed statistics of the study's rows: mean ± sample std over seeds, and the comparison of two rows
that docs/results.md and docs/study.md use.

A difference d between two rows' means is called *clear* when |d| > 2 se, with
se = sqrt(s_a^2/n_a + s_b^2/n_b) (sample std over seeds), else *within seed noise*. With 3 seeds that
is a rough screen, not a significance test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def stats(values: list[float]) -> tuple[float, float, int]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan"), 0
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return float(np.mean(vals)), std, len(vals)


def digits(x: float) -> int:
    """3 decimals, 4 for small magnitudes (KL and JSD live around 1e-3)."""
    return 4 if 0 < abs(x) < 0.1 else 3


def fmt(values: list[float]) -> str:
    m, s, n = stats(values)
    if n == 0:
        return "n/a"
    d = digits(m)
    return f"{m:.{d}f}" if n == 1 else f"{m:.{d}f} ± {s:.{d}f}"


@dataclass
class Comparison:
    """a vs b over seeds: means, their difference d and its se, and the verdict."""

    a: float
    b: float
    d: float
    se: float
    clear: bool  # |d| > 2 se
    # "better" or "worse" (said of a; when higher or lower is better), "different" (when neither
    # is), or "within seed noise" (not clear)
    word: str
    na: int  # seeds behind a
    nb: int


def compare(a: list[float], b: list[float], higher_better: bool | None) -> Comparison:
    """a vs b: difference of means, se, and a verdict word."""
    ma, sa, na = stats(a)
    mb, sb, nb = stats(b)
    d = ma - mb
    se = math.sqrt((sa ** 2 / na if na else 0) + (sb ** 2 / nb if nb else 0))
    clear = abs(d) > 2 * se and abs(d) > 1e-9
    if higher_better is None or not clear:
        word = "within seed noise" if not clear else "different"
    else:
        word = "better" if (d > 0) == higher_better else "worse"
    return Comparison(a=ma, b=mb, d=d, se=se, clear=clear, word=word, na=na, nb=nb)
