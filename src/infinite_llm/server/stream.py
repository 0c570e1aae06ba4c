"""``RequestStream``: one request's outputs, handed from the engine's dispatch to one consumer.

An async iterator (outputs in order, then the end or the error that ended it) and an async
context manager: leaving it before the request finished (a client gone, a task cancelled)
aborts the request, which frees its rBlocks on every instance.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from infinite_llm.outputs import RequestOutput


class RequestStream:
    """One request's outputs in order: an async iterator, and an async context manager that
    aborts the request (freeing its rBlocks) when left before the request finished.

    Outputs a slow consumer has not taken yet are merged into one per sample (deltas
    concatenated, as vLLM's output collector does), so memory stays bounded whatever the
    client's pace.
    """

    def __init__(
        self, request_id: str, prompt_token_ids: list[int], on_abort: Callable[[str], None]
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.num_prompt_tokens = len(prompt_token_ids)
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.num_output_tokens = 0
        self._on_abort = on_abort
        self._items: deque[RequestOutput | BaseException] = deque()
        self._ready = asyncio.Event()
        self._done = False  # nothing more will come (finished, failed or aborted)

    @property
    def started(self) -> bool:
        """Whether a first token came out (before that the request counts as waiting)."""
        return self.first_token_time is not None

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        while not self._items:
            if self._done:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if isinstance(item, BaseException):
            raise item
        return item

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.abort()

    def abort(self) -> None:
        """Stop the request wherever it runs (no-op once it finished)."""
        if not self._done:
            self._done = True
            self._ready.set()
            self._on_abort(self.request_id)

    # -- called on the loop by the engine's dispatch (never by consumers) ----------------------
    def _record(self, output: RequestOutput) -> None:
        """Token timings and counts, before the output is queued (and maybe merged)."""
        now = time.monotonic()
        if output.delta_token_ids:
            if self.first_token_time is None:
                self.first_token_time = now
            self.last_token_time = now
            self.num_output_tokens += len(output.delta_token_ids)

    def _push(self, output: RequestOutput) -> None:
        if output.finished:
            self._done = True
        # Not taken yet: merged into the pending output of the same sample(s) (a request of
        # several samples streams each on its own, then all of them once), the newest carrying
        # the totals; at most one pending output per sample, in each sample's order.
        samples = [c.index for c in output.outputs]
        for i in range(len(self._items) - 1, -1, -1):
            last = self._items[i]
            if not isinstance(last, RequestOutput):
                self._items.append(output)  # never merged across an error
                break
            if [c.index for c in last.outputs] == samples:
                output.delta_text = last.delta_text + output.delta_text
                output.delta_token_ids = last.delta_token_ids + output.delta_token_ids
                self._items[i] = output
                break
        else:
            self._items.append(output)
        self._ready.set()

    def _fail(self, exc: BaseException) -> None:
        self._done = True
        self._items.append(exc)
        self._ready.set()
