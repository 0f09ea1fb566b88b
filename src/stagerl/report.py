"""``stagerl report RUN_DIR``: PNG plots of a run's metrics.jsonl (matplotlib, headless). A torn
last line of metrics.jsonl (a kill during a write) is dropped. A metric logged twice for one step
(two runs' files joined, say) is plotted from the later row, with one warning naming the steps."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from stagerl.errors import UserError
from stagerl.tracking import mean_around, read_metrics

log = logging.getLogger(__name__)

# (file name, title, [(metric key, label)])
PLOTS = [
    ("reward.png", "Training reward (rollout mean; smoothed line)", []),  # keys found at runtime
    ("heldout.png", "Held-out strict score", [("eval/overall", "overall (mean of tags)")]),
    ("entropy.png", "Entropy", [("policy/entropy", "policy"), ("ref/entropy", "reference")]),
    ("kl.png", "KL to reference (k3)", [("policy/kl_k3", "KL")]),
]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key``, one point per step, in step order; a later row of the same step
    wins (see :func:`repeated_steps`)."""
    pts = {r["step"]: r[key] for r in rows if r.get(key) is not None}
    steps = sorted(pts)
    return steps, [float(pts[s]) for s in steps]


def repeated_steps(rows: list[dict]) -> list[int]:
    """Steps for which some metric appears in more than one row. One step normally has several
    rows (the training row, then an evaluation's), but never the same metric twice."""
    seen: set[tuple[int, str]] = set()
    repeated: set[int] = set()
    for r in rows:
        for key in r:
            if key != "step":
                if (r["step"], key) in seen:
                    repeated.add(r["step"])
                seen.add((r["step"], key))
    return sorted(repeated)


def _ema(ys: list[float], alpha: float = 0.15) -> list[float]:
    out, acc = [], ys[0]
    for y in ys:
        acc = alpha * y + (1 - alpha) * acc
        out.append(acc)
    return out


def _honest_y_axis(ax, ys: list[float]) -> None:
    """Plain tick labels (no '+0.5' offset) and a y-range of at least 0.1 % of the values' size,
    so that a change of 1e-5 does not fill the plot's height."""
    ax.ticklabel_format(axis="y", useOffset=False)
    if not ys:
        return
    lo, hi = min(ys), max(ys)
    floor = 1e-3 * max(abs(lo), abs(hi))
    if hi - lo < floor:
        mid = (lo + hi) / 2
        ax.set_ylim(mid - floor, mid + floor)


def write_plots(run_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise UserError(f"{run_dir}: no metrics.jsonl with rows (is this a run directory?)")
    repeated = repeated_steps(rows)
    if repeated:
        shown = ", ".join(map(str, repeated[:10])) + (" ..." if len(repeated) > 10 else "")
        log.warning("%s: %d step(s) logged more than once (%s); plotting the later row of each",
                    run_dir / "metrics.jsonl", len(repeated), shown)
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []
    reward_keys = sorted({k for r in rows for k in r if k.startswith("reward/")
                          and k.endswith("/mean") and k.count("/") == 2})
    for fname, title, keys in PLOTS:
        if fname == "reward.png":
            keys = [(k, k.split("/")[1]) for k in reward_keys]
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
        drew, all_ys = False, []
        for key, label in keys:
            xs, ys = series(rows, key)
            all_ys += [y for y in ys if math.isfinite(y)]
            if xs:
                line, = ax.plot(xs, ys, marker="o" if len(xs) < 12 else None, ms=3, label=label,
                                alpha=0.4 if len(xs) >= 12 else 1.0)
                if len(xs) >= 12:
                    ax.plot(xs, _ema(ys), color=line.get_color())
                drew = True
        if drew:
            _honest_y_axis(ax, all_ys)
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(out_dir / fname)
            written.append(out_dir / fname)
        plt.close(fig)
    gold = gold_proxy_plot(rows, out_dir / "gold_proxy.png")
    return written + ([gold] if gold else [])


def gold_proxy_plot(rows: list[dict], path: Path) -> Path | None:
    """A run trained on a learned proxy: the proxy and gold (exact strict, lenient) against
    d = sqrt(KL of an image to the base), per training step (smoothed lines) and at every held-out
    evaluation (markers); the over-optimisation picture of docs/study.md. None for other runs."""
    proxies = sorted({k.split("/")[2] for r in rows for k in r if k.startswith("eval/proxy/")})
    kx, ky = series(rows, "policy/kl_seq_k3")
    if not proxies or not kx:
        return None
    import matplotlib.pyplot as plt

    name = proxies[0]
    d_train = [math.sqrt(max(0.0, v)) for v in _ema(ky)]
    by_step = dict(zip(kx, d_train))
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
    for key, label, color in ((f"reward/{name}/mean", f"proxy ({name})", "black"),
                              ("monitor/shapes_strict/mean", "gold strict", "tab:blue"),
                              ("monitor/shapes_lenient/mean", "gold lenient", "tab:green")):
        xs, ys = series(rows, key)
        pts = [(by_step[x], y) for x, y in zip(xs, _ema(ys) if ys else []) if x in by_step]
        if pts:  # dots, not a line: the per-step KL is noisy, so d does not grow monotonically
            ax.plot(*zip(*pts), ".", color=color, alpha=0.25, ms=3,
                    label=f"{label}, training steps (EMA)")
    for key, label, color in ((f"eval/proxy/{name}", "proxy", "black"),
                              ("eval/overall", "gold strict", "tab:blue"),
                              ("eval/lenient_overall", "gold lenient", "tab:green")):
        xs, ys = series(rows, key)
        ds = [math.sqrt(max(0.0, mean_around(dict(zip(kx, ky)), x, 2))) for x in xs]
        if xs:
            ax.plot(ds, ys, "o-", color=color, ms=4, lw=1.5, label=f"{label}, held-out")
    ax.set_xlabel("d = sqrt(KL to the base, per image)")
    ax.set_title("Proxy vs gold against sqrt(KL)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="best", framealpha=0.6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
