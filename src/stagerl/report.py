"""``stagerl report RUN_DIR``: PNG plots of a run's metrics.jsonl (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from stagerl.errors import UserError
from stagerl.tracking import read_metrics

# (file name, title, [(metric key, label)])
PLOTS = [
    ("reward.png", "Training reward", [("reward/total/mean", "combined reward R")]),
    ("heldout.png", "Held-out strict score", [("eval/overall", "overall (mean of tags)")]),
    ("entropy.png", "Entropy", [("policy/entropy", "policy"), ("ref/entropy", "reference")]),
    ("kl.png", "KL to reference (k3)", [("policy/kl_k3", "KL")]),
]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def write_plots(run_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise UserError(f"{run_dir}: no metrics.jsonl with rows (is this a run directory?)")
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []
    for fname, title, keys in PLOTS:
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
        drew = False
        for key, label in keys:
            xs, ys = series(rows, key)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 12 else None, ms=3, label=label)
                drew = True
        if drew:
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(out_dir / fname)
            written.append(out_dir / fname)
        plt.close(fig)
    return written
