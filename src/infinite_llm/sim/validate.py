"""Validating the simulator against measured runs: each run predicted with costs fitted on the others.

A measured run is its trace (the exact requests), its configuration (instances, borrowing on
or off) and its summary. For each, the ``LinearCosts`` are fitted on every *other* run's step
samples (leave one run out, so no run predicts itself), the ``serial`` simulator replays the
same requests on the same pools, and predicted and measured throughput, longest context and
makespan are compared.

One replay is one draw of a process that is chaotic under memory pressure: which request a
full pool preempts, and so how much is recomputed, depends on whether an arrival lands before
or after a step (nine replays of one 24-request trace read 130 to 149 tok/s). So each run is
replayed ``replays`` times with step times scaled by noise of the size the fit left
unexplained (``NoisyCosts``, sigma = the fit's ``step_noise_sigma``); the prediction is the
median replay and the JSON gives the range.
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

from infinite_llm.sim.costs import NoisyCosts
from infinite_llm.sim.fit import Samples, fit_linear_costs
from infinite_llm.sim.metrics import ratio
from infinite_llm.sim.presets import preset_from_fit
from infinite_llm.sim.simulator import simulate

KEYS = ("tokens_per_s", "longest_context_served", "makespan_s")
VALIDATION_COLUMNS = (
    "run",
    "tok/s meas",
    "tok/s sim",
    "sim range",
    "err",
    "longest meas",
    "longest sim",
    "stopped",
)


def validation_rows(validation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``validate``'s entries as table rows (``VALIDATION_COLUMNS``)."""
    return [
        {
            "run": v["label"],
            "tok/s meas": v["measured_tokens_per_s"],
            "tok/s sim": v["predicted_tokens_per_s"],
            "sim range": "-".join(f"{x:.0f}" for x in v["predicted_tokens_per_s_range"]),
            "err": v["tokens_per_s_error"],
            "longest meas": v["measured_longest_context_served"],
            "longest sim": v["predicted_longest_context_served"],
            "stopped": v["measured_stopped"]
            or (f"sim {v['predicted_stopped']}" if v["predicted_stopped"] else ""),
        }
        for v in validation
    ]


def validate(
    runs: list[dict[str, Any]], samples: Samples, base_doc: dict[str, Any], replays: int = 9
) -> list[dict[str, Any]]:
    """Simulate every run with costs fitted on the other runs; predicted (the median of
    ``replays`` noisy replays, or one exact replay when ``replays`` is 0) vs measured. A run the
    real engine or the simulator (most replays) stopped (livelock, timeout) has no error."""
    out = []
    for run in runs:
        costs, report = fit_linear_costs(samples.without(run["label"]))
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
        models = (
            [
                NoisyCosts(preset.costs(), report["step_noise_sigma"], seed)
                for seed in range(replays)
            ]
            if replays > 0
            else [preset.costs()]
        )
        sims = [simulate(config, m, run["requests"], execution="serial").summary() for m in models]
        stops = Counter(s["stopped"] for s in sims)
        predicted_stopped, _ = stops.most_common(1)[0]
        done = [s for s in sims if s["stopped"] is None]
        meas = run["summary"]
        entry: dict[str, Any] = {
            "label": run["label"],
            "measured_stopped": meas["stopped"],
            "predicted_stopped": predicted_stopped,
            "replays": len(sims),
            "replays_stopped": len(sims) - len(done),
        }
        comparable = meas["stopped"] is None and predicted_stopped is None
        for key in KEYS:  # over the replays that finished, or all when none did
            values = sorted(s[key] for s in done or sims)
            pred = statistics.median(values)
            entry[f"measured_{key}"], entry[f"predicted_{key}"] = meas[key], pred
            entry[f"predicted_{key}_range"] = [values[0], values[-1]]
            entry[f"{key}_error"] = (
                (ratio(pred, meas[key]) - 1.0 if meas[key] else 0.0) if comparable else None
            )
        out.append(entry)
    return out
