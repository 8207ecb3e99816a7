"""loss.png from the run's metrics.jsonl (train loss per step, eval loss where measured)."""

from __future__ import annotations

from pathlib import Path

from megatron_ext.observability.files import read_jsonl


def plot_loss(metrics_path: Path, out_png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train"]
    evals = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss", ms=4)
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
