"""``Router``: picks each new request's home instance, least loaded by the gManager's view."""

from __future__ import annotations

from collections.abc import Sequence


class Router:
    """Most free rBlocks (as last heard in heartbeats, minus what was routed since), then fewest
    requests. Loosely coherent like the gManager itself: it never needs to be exact."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._routed_blocks: dict[int, int] = {}  # blocks promised since the instance's last heartbeat

    def on_heartbeat(self, instance_id: int) -> None:
        self._routed_blocks.pop(instance_id, None)

    def pick(self, instance_ids: Sequence[int], free_blocks: dict[int, int], num_requests: dict[int, int],
             num_tokens: int) -> int:
        if not instance_ids:
            raise RuntimeError("no live instance to route to")

        def score(i: int) -> tuple[int, int, int]:
            free = free_blocks.get(i, 0) - self._routed_blocks.get(i, 0)
            return (free, -num_requests.get(i, 0), -i)

        home = max(instance_ids, key=score)
        self._routed_blocks[home] = self._routed_blocks.get(home, 0) + -(-num_tokens // self.block_size)
        return home
