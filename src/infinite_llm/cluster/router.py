"""``Router``: picks each new request's home instance: fewest requests among those with room."""

from __future__ import annotations

from collections.abc import Sequence


class Router:
    """Among the instances whose free rBlocks (as last heard in heartbeats, minus what was routed
    since) hold the request, the one with the fewest requests (then the most free rBlocks);
    when none holds it, the one with the most free rBlocks (it borrows the rest). Free memory
    alone is a poor load signal while memory is plentiful: a queue can grow on the instance
    that happens to report a few more free rBlocks. Loosely coherent like the gManager itself."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._routed_blocks: dict[int, int] = {}  # blocks promised since the instance's last heartbeat

    def on_heartbeat(self, instance_id: int) -> None:
        self._routed_blocks.pop(instance_id, None)

    def pick(self, instance_ids: Sequence[int], free_blocks: dict[int, int], num_requests: dict[int, int],
             num_tokens: int) -> int:
        if not instance_ids:
            raise RuntimeError("no live instance to route to")

        need = -(-num_tokens // self.block_size)

        def score(i: int) -> tuple[bool, int, int, int]:
            free = free_blocks.get(i, 0) - self._routed_blocks.get(i, 0)
            fits = free >= need
            return (fits, -num_requests.get(i, 0) if fits else 0, free, -i)

        home = max(instance_ids, key=score)
        self._routed_blocks[home] = self._routed_blocks.get(home, 0) + need
        return home
