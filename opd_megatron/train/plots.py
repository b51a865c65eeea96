"""PNG curves of a run's ``metrics.jsonl`` (training loss / KL and held-out evaluation)."""

from __future__ import annotations

from pathlib import Path

from opd_megatron.train.metrics import read_metrics


def plot_metrics(metrics_path: str | Path, out_path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is assumed
    import matplotlib.pyplot as plt

    train = [r for r in read_metrics(metrics_path, "train") if isinstance(r.get("loss"), float)]
    evals = read_metrics(metrics_path, "eval")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train], label="loss")
    if train and "kl_per_token" in train[0]:
        axes[0].plot(steps, [r["kl_per_token"] for r in train], label="KL / token (train)")
    axes[0].set_xlabel("step")
    axes[0].legend()
    axes[0].set_title("training")
    em_keys = sorted({k for r in evals for k in r if k.startswith("exact_match/")})
    for k in em_keys:
        pts = [(r["step"], r[k]) for r in evals if k in r]
        axes[1].plot(*zip(*pts), marker="o", label=k.split("/", 1)[1])
    axes[1].set_ylim(-0.02, 1.02)
    axes[1].set_xlabel("step")
    axes[1].set_title("held-out exact match")
    if em_keys:
        axes[1].legend()
    kl = [
        (r["step"], r["heldout_reverse_kl"]) for r in evals if isinstance(r.get("heldout_reverse_kl"), float)
    ]
    if kl:
        axes[2].plot(*zip(*kl), marker="o")
    axes[2].set_xlabel("step")
    axes[2].set_title("held-out reverse KL to the teacher")
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path
