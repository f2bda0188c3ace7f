"""A chart of benchmark summaries: one panel per metric, one bar per system, min–max whiskers
(peak RSS: the largest reading, no whiskers).

matplotlib is optional (it is no dependency of the runtime): it is imported only here, only
when a chart is asked for.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

from .bench import BenchError, Stat, Summary

PANELS = (  # metric, title, better
    ("decode_tps", "Decode (tokens/s)", "higher is better"),
    ("prefill_tps", "Prefill (tokens/s)", "higher is better"),
    ("ttft_ms", "Time to first token (ms)", "lower is better"),
    ("peak_rss_mb", "Peak RSS (MB), load included", "lower is better"),
)
# Each round reads the process's peak so far (VmHWM only grows): the peak is the largest reading, and
# the readings' spread is no spread of a measurement.
PEAKS = {"peak_rss_mb"}


def require_matplotlib() -> None:
    """Fail before minutes of measuring, not after, when the chart cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        raise BenchError("--plot needs matplotlib: pip install matplotlib") from None


def chart_path(out: str | Path) -> Path:
    """Where a chart asked for at `out` will be written, checked before minutes of measuring rather than
    after: matplotlib installed, a format it writes, a file (not a folder) in an existing folder this user can
    write in. A name without a suffix gets .png,
    as matplotlib's savefig would add it, so the path said afterwards is the file's."""
    require_matplotlib()
    out = Path(out)
    check_not_a_folder(out)  # before the suffix: `--plot results` meant into that folder, not beside it
    if not out.suffix:
        out = out.with_suffix(".png")
    formats = supported_formats()
    if out.suffix[1:].lower() not in formats:
        raise BenchError(f"--plot {out}: matplotlib cannot write {out.suffix} files; end the name with one of "
                         f"{', '.join('.' + f for f in formats)} (or none, for .png)")
    check_writable(out)
    return out


def check_not_a_folder(out: Path, flag: str = "--plot", example: str = "chart.png") -> None:
    if out.is_dir():
        raise BenchError(f"{flag} {out}: that is a folder; name a file in it, e.g. {out / example}")


def check_writable(out: Path, flag: str = "--plot", example: str = "chart.png") -> None:
    """Refuse a path that writing would fail on only after the rounds: a folder, a folder that is a
    file or is missing, one this user cannot write in. `flag` and `example` word the error (--json's too)."""
    check_not_a_folder(out, flag, example)
    if out.parent.exists() and not out.parent.is_dir():
        raise BenchError(f"{flag} {out}: {out.parent} is a file, not a folder; name a file in a folder")
    if not out.parent.is_dir():
        raise BenchError(f"{flag} {out}: the folder {out.parent} does not exist; create it first "
                         "(mkdir -p) or name a file in an existing folder")
    if not os.access(out.parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise BenchError(f"{flag} {out}: this user cannot write there; name a file in a folder you can write to")


def supported_formats() -> list[str]:
    """The file formats matplotlib's savefig writes here, by suffix (png, svg, pdf, ...)."""
    from matplotlib.figure import Figure

    return sorted(Figure().canvas.get_supported_filetypes())


def plot_summaries(entries: Sequence[tuple[str, Summary]], out: str | Path, title: str,
                   groups: Sequence[str] | None = None,
                   ceilings: Sequence[float | None] | None = None) -> Path:
    """Draw a 2x2 bar chart (medians, min–max whiskers, values printed on the bars) to a PNG.
    Entries with the same group (e.g. one system at several thread counts) share a color.
    `ceilings` (decode tokens/s that the read bandwidth allows, per entry; None where unknown)
    are drawn as dashed marks over the decode bars."""
    fig = draw_summaries(entries, title, groups, ceilings)
    import matplotlib.pyplot as plt

    out = Path(out)
    try:
        fig.savefig(out, dpi=120)
    except OSError as e:  # checked before measuring (chart_path), but the disk can fill or the folder go since
        raise BenchError(f"--plot {out}: the chart cannot be written ({e.strerror or e}); the measurements "
                         "are printed above") from None
    finally:
        plt.close(fig)
    return out


def draw_summaries(entries: Sequence[tuple[str, Summary]], title: str, groups: Sequence[str] | None = None,
                   ceilings: Sequence[float | None] | None = None):  # -> matplotlib Figure
    """The figure plot_summaries saves."""
    if ceilings is not None and len(ceilings) != len(entries):
        raise ValueError(f"{len(ceilings)} ceilings for {len(entries)} entries")
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # no display needed: the chart goes to a file
    import matplotlib.pyplot as plt

    labels = [label for label, _ in entries]
    groups = list(groups) if groups is not None else labels
    palette = {g: plt.get_cmap("tab10")(i % 10) for i, g in enumerate(dict.fromkeys(groups))}
    colors = [palette[g] for g in groups]
    fig, axes = plt.subplots(2, 2, figsize=(max(8.0, 1.6 * len(entries) + 4), 7.5), constrained_layout=True)
    for ax, (metric, name, better) in zip(axes.flat, PANELS, strict=True):
        stats: list[Stat | None] = [getattr(summary, metric) for _, summary in entries]
        if metric in PEAKS:
            heights = [s.max if s else 0.0 for s in stats]
            ax.bar(range(len(entries)), heights, color=colors)
        else:
            heights = [s.median if s else 0.0 for s in stats]
            below = [s.median - s.min if s else 0.0 for s in stats]
            above = [s.max - s.median if s else 0.0 for s in stats]
            ax.bar(range(len(entries)), heights, color=colors, yerr=[below, above], capsize=4)
        marks = [(x, c) for x, c in enumerate(ceilings or []) if c] if metric == "decode_tps" else []
        top = max([*(s.max for s in stats if s), *(c for _, c in marks)], default=1.0) * 1.2
        ax.set_ylim(0, top)
        if marks:
            draw_ceilings(ax, marks)
        # Values at the foot of the bars, where the min–max whiskers never reach.
        for x, (height, stat) in enumerate(zip(heights, stats, strict=True)):
            ax.text(x, top * 0.02, f"{height:.0f}" if stat else "n/a", ha="center", va="bottom",
                    color="white" if stat else "black", fontweight="bold")
        ax.set_title(f"{name}\n{better}", fontsize=10)
        ax.set_xticks(range(len(entries)), labels, rotation=15, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    # A title of several bundle paths is wider than the chart: wrap it rather than clip it.
    fig.suptitle(textwrap.fill(title, width=int(fig.get_figwidth() * 11)), fontsize=11)
    return fig


def draw_ceilings(ax, marks: Sequence[tuple[int, float]]) -> None:
    """A dashed mark over each bar at its ceiling, with its value: how far decode is from what the
    memory bandwidth allows, next to the bar rather than in a note below the chart."""
    xs, ys = zip(*marks, strict=True)
    ax.hlines(ys, [x - 0.4 for x in xs], [x + 0.4 for x in xs], colors="black", linestyles="dashed",
              label="read-bandwidth ceiling")
    for x, y in marks:
        ax.text(x, y, f"{y:.0f}", ha="center", va="bottom", fontsize=7)
    ax.legend(loc="upper right", fontsize=7)
