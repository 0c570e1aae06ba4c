"""Fitting the simulator's ``LinearCosts`` to per-step timings of real runs (least squares).

``bench paper`` records, for every non-empty instance step of a real run, the step's
features (``costs.features`` of the ``StepWork`` computed exactly as the simulator computes
it) and its wall time; for every cluster step, the time spent outside instance steps; for
every defragmentation, the rBlocks moved and its time. The fit is non-negative least
squares on the step samples (a cost can never be negative; Lawson-Hanson), a mean for the
cluster-step overhead, and time per moved rBlock for migration.

The fitted costs and the configuration they were measured under are stored as JSON (by
default ``~/.cache/infinite-llm/sim-fit.json``), which ``presets.fitted_preset`` reads.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from infinite_llm.sim.costs import FEATURES, LinearCosts

FIT_VERSION = 1


@dataclass(frozen=True, slots=True)
class StepSample:
    run: str
    features: tuple[float, ...]
    seconds: float


@dataclass(frozen=True, slots=True)
class OverheadSample:
    """One cluster step: seconds outside the instances' non-empty steps and defragmentation."""

    run: str
    seconds: float


@dataclass(frozen=True, slots=True)
class MigrationSample:
    run: str
    num_blocks: int
    seconds: float


@dataclass
class Samples:
    steps: list[StepSample]
    overheads: list[OverheadSample]
    migrations: list[MigrationSample]

    def without(self, run: str) -> Samples:
        return Samples(
            [s for s in self.steps if s.run != run],
            [s for s in self.overheads if s.run != run],
            [s for s in self.migrations if s.run != run],
        )


def nnls(a: np.ndarray, b: np.ndarray, tol: float = 1e-12, max_iter: int = 1000) -> np.ndarray:
    """min ||a x - b|| subject to x >= 0 (Lawson and Hanson's active-set method)."""
    num_cols = a.shape[1]
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    a = a / scale  # columns of very different magnitude (1 vs query x context pairs)
    passive = np.zeros(num_cols, dtype=bool)
    x = np.zeros(num_cols)
    w = a.T @ (b - a @ x)
    for _ in range(max_iter):
        if passive.all() or w[~passive].max(initial=-np.inf) <= tol * max(
            1.0, float(np.abs(b).max(initial=0.0))
        ):
            break
        passive[int(np.argmax(np.where(passive, -np.inf, w)))] = True
        while True:
            z = np.zeros(num_cols)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                break
            shrink = passive & (z <= 0)
            alpha = float(np.min(x[shrink] / (x[shrink] - z[shrink])))
            x = x + alpha * (z - x)
            passive &= x > tol
            if not passive.any():
                z = np.zeros(num_cols)
                break
        x = z
        w = a.T @ (b - a @ x)
    return x / scale


def fit_linear_costs(samples: Samples) -> tuple[LinearCosts, dict[str, Any]]:
    """Fitted costs and how well they explain the step samples."""
    if len(samples.steps) < len(FEATURES):
        raise ValueError(
            f"need at least {len(FEATURES)} step samples to fit, got {len(samples.steps)}"
        )
    a = np.array([s.features for s in samples.steps], dtype=float)
    b = np.array([s.seconds for s in samples.steps], dtype=float)
    coef = nnls(a, b)
    pred = a @ coef
    resid = b - pred
    total = float(((b - b.mean()) ** 2).sum())
    rel = np.abs(resid) / np.maximum(b, 1e-9)
    ok = (b > 0) & (pred > 0)
    log_ratio = np.log(b[ok] / pred[ok])
    # robust (median absolute deviation) spread of log(measured / fitted): the step-time noise
    noise = 1.4826 * float(np.median(np.abs(log_ratio - np.median(log_ratio)))) if ok.any() else 0.0
    overhead = float(np.mean([s.seconds for s in samples.overheads])) if samples.overheads else 0.0
    moved = sum(m.num_blocks for m in samples.migrations)
    migrate = sum(m.seconds for m in samples.migrations) / moved if moved else 0.0
    costs = LinearCosts(
        tuple(float(c) for c in coef),
        cluster_step_s=max(0.0, overhead),
        migrate_block_s=max(0.0, migrate),
    )
    report = {
        "num_step_samples": len(samples.steps),
        "num_cluster_steps": len(samples.overheads),
        "num_migrated_blocks": moved,
        "r2": 1.0 - float((resid**2).sum()) / total if total > 0 else math.nan,
        "median_abs_rel_err": float(np.median(rel)),
        "p90_abs_rel_err": float(np.quantile(rel, 0.9)),
        "total_time_rel_err": float(pred.sum() / b.sum() - 1.0),
        "step_noise_sigma": noise,
    }
    return costs, report


def fit_document(
    costs: LinearCosts,
    report: dict[str, Any],
    config: dict[str, Any],
    workload: dict[str, Any],
    machine: dict[str, Any],
) -> dict[str, Any]:
    """The JSON ``presets.preset_from_fit`` reads back."""
    return {
        "version": FIT_VERSION,
        "features": list(FEATURES),
        "costs": {
            "coefficients": costs.as_dict(),
            "cluster_step_s": costs.cluster_step_s,
            "migrate_block_s": costs.migrate_block_s,
        },
        "fit": report,
        "config": config,
        "workload": workload,
        "machine": machine,
    }


def save_fit(path: str | os.PathLike[str], document: dict[str, Any]) -> Path:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2))
    return path


def relative_errors(predicted: Sequence[float], measured: Sequence[float]) -> list[float]:
    return [p / m - 1.0 if m else math.nan for p, m in zip(predicted, measured)]
