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


def _eval_curves(run_dir: Path, domains: list[str]) -> tuple[list, list, list]:
    """(steps, mean held-out exact match over ``domains``, held-out reverse KL) of a run's evaluations."""
    evals = read_metrics(run_dir / "metrics.jsonl", "eval")
    steps = [r["step"] for r in evals]
    em = [sum(r.get(f"exact_match/{d}", float("nan")) for d in domains) / len(domains) for r in evals]
    kl = [r.get("heldout_reverse_kl", float("nan")) for r in evals]
    return steps, em, kl


def plot_runs(
    runs: dict[str, list[Path]], compute_per_step: dict[str, float], domains: list[str], out_path
) -> Path:
    """One PNG of several runs (one line per seed): mean held-out exact match and held-out reverse KL,
    against steps and against student compute (``compute_per_step[label]`` per step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, dirs) in enumerate(runs.items()):
        for k, run_dir in enumerate(dirs):
            steps, em, kl = _eval_curves(Path(run_dir), domains)
            compute = [s * compute_per_step[label] for s in steps]
            style = {"color": colors[i % len(colors)], "marker": "o", "ms": 3, "alpha": 0.8}
            style["label"] = label if k == 0 else None
            axes[0, 0].plot(steps, em, **style)
            axes[0, 1].plot(compute, em, **style)
            axes[1, 0].plot(steps, kl, **style)
            axes[1, 1].plot(compute, kl, **style)
    for ax in axes[0]:
        ax.set(ylabel="mean held-out exact match", ylim=(-0.02, 1.02))
    for ax in axes[1]:
        ax.set(ylabel="held-out reverse KL / token (to the run's teacher)", yscale="log")
    for ax in axes[:, 0]:
        ax.set_xlabel("step")
    for ax in axes[:, 1]:
        ax.set_xlabel("student compute (thousand sequence forward passes)")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path
