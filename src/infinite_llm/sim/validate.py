"""Validating the simulator against measured runs: each run predicted with costs fitted on the others.

A measured run is its trace (the exact requests), its configuration (instances, borrowing on
or off) and its summary. For each, the ``LinearCosts`` are fitted on every *other* run's step
samples (leave one run out, so no run predicts itself), the ``serial`` simulator replays the
same requests on the same pools, and predicted and measured throughput, longest context and
makespan are compared.
"""

from __future__ import annotations

from typing import Any

from infinite_llm.sim.fit import Samples, fit_linear_costs
from infinite_llm.sim.metrics import ratio
from infinite_llm.sim.presets import preset_from_fit
from infinite_llm.sim.simulator import simulate


def validate(
    runs: list[dict[str, Any]], samples: Samples, base_doc: dict[str, Any]
) -> list[dict[str, Any]]:
    """Simulate every run with costs fitted on the other runs; predicted vs measured. A run the
    real engine or the simulator stopped (livelock, timeout) is listed but has no error."""
    out = []
    for run in runs:
        costs, _ = fit_linear_costs(samples.without(run["label"]))
        preset = preset_from_fit(
            {
                **base_doc,
                "costs": {
                    "coefficients": costs.as_dict(),
                    "cluster_step_s": costs.cluster_step_s,
                    "migrate_block_s": costs.migrate_block_s,
                },
            }
        )
        config = preset.cluster_config(run["instances"], run["mode"] == "borrowing")
        sim = simulate(config, preset.costs(), run["requests"], execution="serial").summary()
        meas = run["summary"]
        entry: dict[str, Any] = {
            "label": run["label"],
            "measured_stopped": meas["stopped"],
            "predicted_stopped": sim["stopped"],
        }
        comparable = meas["stopped"] is None and sim["stopped"] is None
        for key in ("tokens_per_s", "longest_context_served", "makespan_s"):
            entry[f"measured_{key}"], entry[f"predicted_{key}"] = meas[key], sim[key]
            entry[f"{key}_error"] = (
                (ratio(sim[key], meas[key]) - 1.0 if meas[key] else 0.0) if comparable else None
            )
        out.append(entry)
    return out
