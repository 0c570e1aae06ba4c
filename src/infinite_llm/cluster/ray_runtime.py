"""Starting Ray: join a given cluster, or start a local one sized to this machine.

A local cluster inlines actor-call payloads up to ``INLINE_BYTES`` (no object-store round trip
for one layer's queries or partial outputs); a joined cluster keeps its own setting.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

INLINE_BYTES = 8 << 20


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join ``address`` or start a local Ray cluster; False (nothing done) if Ray is up already."""
    if ray.is_initialized():
        return False
    quiet: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "ignore_reinit_error": True,
    }
    if address is not None:
        ray.init(address=address, **quiet)
    else:
        ray.init(
            num_cpus=num_cpus or os.cpu_count() or 1,
            **quiet,
            _system_config={
                "max_direct_call_object_size": INLINE_BYTES,
                "task_rpc_inlined_bytes_limit": 4 * INLINE_BYTES,
            },
        )
    return True
