"""PNG plots of the paper's two figures: throughput ratio and max-context ratio against N.

Used by ``infinite-llm simulate`` and ``infinite-llm bench paper``; needs matplotlib (the
``bench`` extra). Returns None (and says so on stderr) when matplotlib is missing.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PAPER_THROUGHPUT = (1.03, 2.4)  # the paper's end-to-end throughput range against vLLM
PAPER_CONTEXT = ((2, 2.0), (32, 19.0))  # (instances, x longer context), its two ends


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files, no display), or None with a note on
    stderr when matplotlib is not installed (a bench or simulation then writes no plot)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "matplotlib is not installed: no plot written (pip install matplotlib)", file=sys.stderr
        )
        return None
    return plt


def plot_ratios(
    path: Path,
    title: str,
    counts: Sequence[int],
    throughput: Mapping[str, Sequence[float]],
    context: Sequence[float],
    *,
    predicted_throughput: Mapping[str, Sequence[float]] | None = None,
    predicted_context: Sequence[float] | None = None,
) -> Path | None:
    """Left: ours/baseline throughput per series (a trace against no-borrow, or an
    untruncated trace against one of the baselines); right: ours/baseline longest context, with the
    pooled-memory bound y = N and the paper's figures. ``predicted_*``: dashed (simulator)."""
    plt = pyplot()
    if plt is None:
        return None
    many = len(throughput) > 4
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5.6 if many else 4.2))
    for i, (name, values) in enumerate(throughput.items()):
        color = f"C{i}"
        left.plot(
            counts,
            values,
            "o-",
            color=color,
            label=f"{name} (measured)" if predicted_throughput else name,
        )
        if predicted_throughput and name in predicted_throughput:
            left.plot(
                counts, predicted_throughput[name], "x--", color=color, label=f"{name} (simulated)"
            )
    left.axhspan(*PAPER_THROUGHPUT, color="0.85", zorder=0, label="paper: 1.03-2.4x")
    left.axhline(1.0, color="0.4", lw=0.8)
    left.set_xscale("log", base=2)
    left.set_xticks(list(counts), [str(n) for n in counts])
    left.set_xlabel("instances")
    left.set_ylabel("throughput, ours / baseline")
    if many:  # below the axes, where it hides no line
        left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    else:
        left.legend(fontsize=8)
    left.set_title("end-to-end throughput")
    right.plot(
        counts,
        context,
        "o-",
        color="C0",
        label="measured" if predicted_context else "ours / no-borrow",
    )
    if predicted_context is not None:
        right.plot(counts, predicted_context, "x--", color="C1", label="simulated")
    right.plot(counts, list(counts), ":", color="0.4", label="pooled memory (y = N)")
    paper = [(n, r) for n, r in PAPER_CONTEXT if min(counts) <= n <= max(counts)]
    if paper:
        right.plot(*zip(*paper), "s", color="C3", label="paper (2 to 32 instances): 2x to 19x")
    right.set_xscale("log", base=2)
    right.set_yscale("log", base=2)
    right.set_xticks(list(counts), [str(n) for n in counts])
    right.set_xlabel("instances")
    right.set_ylabel("longest context, ours / no-borrow")
    right.legend(fontsize=8)
    right.set_title("longest context served")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
