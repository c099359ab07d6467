"""The report's PNG charts (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from heft_core.study_report.rows import StudyReport

CHART_FILES = ("accuracy_by_arm.png", "accuracy_vs_epochs.png", "frontier_flops.png", "frontier_wall_seconds.png")


def write_charts(report: StudyReport, directory: str | Path) -> list[str]:
    """PNG charts (matplotlib, Agg) into ``directory``; returns their file names.

    ``accuracy_by_arm.png`` (each seed and the mean), ``accuracy_vs_epochs.png``,
    ``frontier_flops.png`` and ``frontier_wall_seconds.png`` (one point per run, arms coloured).
    Every chart draws the majority answer's accuracy as a line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    majority = report.majority["accuracy"] * 100
    done = [r for r in report.runs if r.accuracy is not None]
    cells = list(dict.fromkeys((r.arm, r.grid) for r in report.runs))
    colours = {cell: plt.get_cmap("tab10")(index % 10) for index, cell in enumerate(cells)}
    names = {cell: cell[0] + (f" ({cell[1]})" if cell[1] else "") for cell in cells}
    written = []

    def finish(fig: Any, ax: Any, name: str, xlabel: str) -> None:
        ax.axhline(
            majority,
            color="grey",
            linestyle=":",
            label=f'majority answer "{report.majority["answer"]}" {majority:.1f}%',
        )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy on the study's evaluation questions (%)")
        ax.set_title(report.name)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7)
        fig.tight_layout()
        fig.savefig(directory / name, dpi=120)
        plt.close(fig)
        written.append(name)

    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(cells) + 2), 5))
    for index, cell in enumerate(cells):
        values = [r.accuracy * 100 for r in done if (r.arm, r.grid) == cell]
        if values:
            ax.scatter([index] * len(values), values, color=colours[cell], alpha=0.7, label=names[cell])
            ax.hlines(sum(values) / len(values), index - 0.3, index + 0.3, color=colours[cell])
    ax.set_xticks(range(len(cells)), [names[c] for c in cells], rotation=30, ha="right", fontsize=8)
    finish(fig, ax, "accuracy_by_arm.png", "arm (dots: seeds; bar: mean)")

    fig, ax = plt.subplots(figsize=(8, 5))
    for cell in cells:
        by_epoch: dict[float, list[float]] = {}
        for run in (r for r in done if (r.arm, r.grid) == cell):
            for epoch, accuracy in run.curve:
                by_epoch.setdefault(epoch, []).append(accuracy * 100)
        if not by_epoch:
            continue
        epochs = sorted(by_epoch)
        means = [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]
        if len(epochs) == 1 and epochs[0] == 0:  # a base run: one zero-shot point
            ax.axhline(means[0], color=colours[cell], linestyle="--", label=f"{names[cell]} {means[0]:.1f}%")
        else:
            ax.plot(epochs, means, "-o", markersize=4, color=colours[cell], label=names[cell])
    finish(fig, ax, "accuracy_vs_epochs.png", "cumulative training epochs (LoRA + ReFT), mean over seeds")

    for name, attribute, xlabel, log in (
        ("frontier_flops.png", "flops", "estimated training FLOPs", True),
        ("frontier_wall_seconds.png", "wall_seconds", "wall seconds per run", False),
    ):
        fig, ax = plt.subplots(figsize=(8, 5))
        for cell in cells:
            points = [
                (getattr(r, attribute), r.accuracy * 100)
                for r in done
                if (r.arm, r.grid) == cell and getattr(r, attribute) is not None
            ]
            positive = [(x, y) for x, y in points if x > 0]
            if positive:
                ax.scatter([x for x, _ in positive], [y for _, y in positive], color=colours[cell], label=names[cell])
            elif points:  # trains nothing (base): a line, it costs no training
                ax.axhline(
                    sum(y for _, y in points) / len(points),
                    color=colours[cell],
                    linestyle="--",
                    label=f"{names[cell]} (no training)",
                )
        if log and ax.collections:
            ax.set_xscale("log")
        finish(fig, ax, name, xlabel)
    return written
