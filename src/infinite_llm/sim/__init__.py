"""Discrete-event simulator: the project's memory managers, borrowing, router, defragmentation and
schedulers on simulated time, with a cost model in place of the model runner.

``trace`` makes workloads (shared with ``bench paper``), ``cluster`` wires the real classes,
``simulator`` runs the events, ``costs``/``specs``/``presets`` price the steps (roofline from
hardware specs, or coefficients ``fit`` to this machine), ``sweep`` is the paper's comparison
against the no-borrow baseline, ``validate`` checks predictions against measured runs.
"""

from __future__ import annotations

from infinite_llm.sim.cluster import SimCluster, SimClusterConfig
from infinite_llm.sim.costs import LinearCosts, RooflineCosts, StepWork
from infinite_llm.sim.metrics import SimResult
from infinite_llm.sim.presets import PRESETS, get_preset
from infinite_llm.sim.simulator import simulate
from infinite_llm.sim.trace import TRACES, Trace, TraceRequest, generate_trace

__all__ = [
    "PRESETS",
    "TRACES",
    "LinearCosts",
    "RooflineCosts",
    "SimCluster",
    "SimClusterConfig",
    "SimResult",
    "StepWork",
    "Trace",
    "TraceRequest",
    "generate_trace",
    "get_preset",
    "simulate",
]
