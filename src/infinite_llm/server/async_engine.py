"""``AsyncLLMEngine``: the ``LLMEngine`` on its own thread, driven from an asyncio event loop.

The engine is not thread-safe, so one thread owns it::

    event loop                          engine thread
    ----------                          -------------
    generate() --add-->  inbox (lock) --> add_request
    stream left early --abort-->      --> abort_request (frees rBlocks on every instance)
    cluster_snapshot() --call-->      --> cluster.stats()
                                          step() while there is work, else wait on the condition
    RequestStream queues  <-- call_soon_threadsafe(outputs of one step)

Tokenizing and chat templates run on a one-thread pool beside the loop, so the loop never
waits on the engine. An exception from ``step()`` fails the requests in flight (their streams
raise ``EngineStepError``) and the thread goes on serving new ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from infinite_llm.llm_engine import LLMEngine
from infinite_llm.outputs import RequestOutput
from infinite_llm.sampling_params import SamplingParams
from infinite_llm.scheduler.request import Request
from infinite_llm.server.stream import RequestStream

logger = logging.getLogger(__name__)

T = TypeVar("T")

SNAPSHOT_REFRESH_S = 0.25  # the engine thread refreshes its fallback snapshot at most this often


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full (the server answers 503)."""


class EngineDeadError(RuntimeError):
    """The engine thread is stopped or shutting down (the server answers 503)."""


class EngineStepError(RuntimeError):
    """The engine failed while this request was in flight (the server answers 500)."""


@dataclass
class _Add:
    request: Request
    prompt_text: str | None


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    fn: Callable[[LLMEngine], Any]
    future: asyncio.Future[Any]


_Command = _Add | _Abort | _Call


OutputHook = Callable[[RequestStream, RequestOutput], None]


class AsyncLLMEngine:
    """Serve an ``LLMEngine`` to coroutines; call ``start()`` from the running loop first."""

    def __init__(
        self,
        engine: LLMEngine,
        max_waiting_requests: int | None = None,
        on_output: OutputHook | None = None,
    ) -> None:
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.on_output = on_output
        self._cond = threading.Condition()
        self._inbox: deque[_Command] = deque()
        self._stopping = False
        self._draining = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, RequestStream] = {}
        self._live: set[str] = set()  # engine thread only: requests the engine holds
        self._tokenizer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
        self.num_step_errors = 0
        self._last_snapshot: dict[str, Any] | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._last_snapshot = _take_snapshot(self.engine)  # the engine thread does not run yet
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return (
            self._thread is not None
            and self._thread.is_alive()
            and not self._stopping
            and not self._draining
        )

    def drain(self) -> None:
        """Refuse new requests and end every open stream with ``EngineDeadError`` (its request
        aborted), so that responses in flight finish now; call on the loop (a SIGINT does)."""
        self._draining = True
        for request_id, stream in list(self._streams.items()):
            stream._fail(EngineDeadError("the server is shutting down"))
            self._abort(request_id)

    def drain_threadsafe(self) -> None:
        """``drain()`` from any thread, or from a signal handler."""
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self.drain)

    async def shutdown(self) -> None:
        """Stop the thread (aborting what is in flight), fail open streams, release the engine."""
        self.drain()
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._tokenizer_pool.shutdown(wait=False)
        self.engine.shutdown()

    # -- requests -----------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def num_waiting(self) -> int:
        """Requests accepted that have no first token yet (queued or prefilling)."""
        return sum(1 for s in self._streams.values() if not s.started)

    @property
    def num_running(self) -> int:
        return sum(1 for s in self._streams.values() if s.started)

    async def run_in_tokenizer(self, fn: Callable[..., T], *args: Any) -> T:
        """Run tokenizer work (encode, chat template) off the loop, beside the engine thread."""
        if not self.is_running or self._loop is None:
            raise EngineDeadError("the engine is not running")
        return await self._loop.run_in_executor(self._tokenizer_pool, fn, *args)

    async def make_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        add_special_tokens: bool = True,
    ) -> Request:
        """Tokenize and validate (``ValueError`` names the problem); nothing is queued yet."""
        return await self.run_in_tokenizer(
            self.engine.make_request, prompt, params, request_id, add_special_tokens
        )

    def generate(self, request: Request, prompt_text: str | None = None) -> RequestStream:
        """Queue a request and return its stream; raises at once when it cannot be accepted."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        if self.max_waiting_requests is not None and self.num_waiting >= self.max_waiting_requests:
            raise EngineOverloadedError(
                f"the server is overloaded: {self.max_waiting_requests} requests are already waiting"
            )
        if request.request_id in self._streams:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        stream = RequestStream(request.request_id, request.prompt_token_ids, self._abort)
        self._streams[request.request_id] = stream
        self._send(_Add(request, prompt_text))
        return stream

    async def cluster_snapshot(self, timeout_s: float | None = None) -> tuple[dict[str, Any], bool]:
        """``(cluster.stats(), fresh)``: taken in the engine thread between two steps; when that
        takes longer than ``timeout_s`` (a long step), the one the engine thread took after its
        last step (at most ``SNAPSHOT_REFRESH_S`` older) and ``False``."""
        pending = asyncio.ensure_future(self.call(_take_snapshot))
        try:
            snapshot = await asyncio.wait_for(asyncio.shield(pending), timeout_s)
        except asyncio.TimeoutError:
            if self._last_snapshot is not None:
                return self._last_snapshot, False
            snapshot = await pending  # nothing to fall back on
        self._last_snapshot = snapshot
        return snapshot, True

    @property
    def snapshot_age_s(self) -> float | None:
        """Seconds since the last snapshot was taken (``None`` before the first)."""
        last = self._last_snapshot
        return None if last is None else time.monotonic() - last["taken_at"]

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` in the engine thread between steps and return its result."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        assert self._loop is not None
        future: asyncio.Future[T] = self._loop.create_future()
        self._send(_Call(fn, future))
        return await future

    def _abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self._send(_Abort(request_id))

    def _send(self, command: _Command) -> None:
        with self._cond:
            self._inbox.append(command)
            self._cond.notify()

    # -- engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not self._inbox and not self._stopping and not self._live:
                    self._cond.wait()
                if self._stopping:
                    break
                commands = list(self._inbox)
                self._inbox.clear()
            results: list[tuple[str, RequestOutput | BaseException]] = []
            for command in commands:
                self._apply(command, results)
            if self._live:
                try:
                    # Each part's outputs go out at once (an instance's tokens do not wait
                    # for the next instance's step).
                    for outputs in engine.step_in_parts():
                        for output in outputs:
                            if output.finished:
                                self._live.discard(output.request_id)
                            results.append((output.request_id, output))
                        if results:
                            self._post(self._dispatch, results)
                            results = []
                except Exception as exc:
                    self.num_step_errors += 1
                    logger.exception(
                        "engine step failed; failing the %d requests in flight", len(self._live)
                    )
                    results.extend(self._fail_live(exc))
                else:
                    if self._live and not engine.has_unfinished_requests():  # never spin on nothing
                        results.extend(
                            self._fail_live(EngineStepError("the engine dropped the request"))
                        )
            if results:
                self._post(self._dispatch, results)
            self._refresh_snapshot()
        self._fail_live(EngineDeadError("the server is shutting down"))
        for command in self._inbox:
            if isinstance(command, _Call):
                self._post(_set_exception, command.future, EngineDeadError("the engine stopped"))

    def _refresh_snapshot(self) -> None:
        """After a step, keep a recent snapshot for when a step runs long (rate-limited)."""
        last = self._last_snapshot
        if last is not None and time.monotonic() - last["taken_at"] < SNAPSHOT_REFRESH_S:
            return
        try:
            self._last_snapshot = _take_snapshot(self.engine)  # one reference swap: safe to read
        except Exception:
            logger.exception("cluster snapshot failed")

    def _apply(
        self, command: _Command, results: list[tuple[str, RequestOutput | BaseException]]
    ) -> None:
        engine = self.engine
        if isinstance(command, _Add):
            request_id = command.request.request_id
            try:
                engine.add_request(command.request, command.prompt_text)
            except Exception as exc:
                logger.exception("could not add request %s", request_id)
                results.append((request_id, EngineStepError(f"could not add the request: {exc}")))
            else:
                self._live.add(request_id)
        elif isinstance(command, _Abort):
            if command.request_id in self._live:
                self._live.discard(command.request_id)
                try:
                    engine.abort_request(command.request_id)
                except Exception:
                    logger.exception("could not abort request %s", command.request_id)
        else:
            try:
                value = command.fn(engine)
            except Exception as exc:
                self._post(_set_exception, command.future, exc)
            else:
                self._post(_set_result, command.future, value)

    def _fail_live(self, exc: BaseException) -> list[tuple[str, RequestOutput | BaseException]]:
        """Abort every request the engine holds (freeing its rBlocks) and report ``exc`` for each."""
        failed: list[tuple[str, RequestOutput | BaseException]] = []
        for request_id in sorted(self._live):
            try:
                self.engine.abort_request(request_id)
            except Exception:
                logger.exception("could not abort request %s after an engine error", request_id)
            known = isinstance(exc, (EngineDeadError, EngineStepError))
            failed.append((request_id, exc if known else EngineStepError(f"engine error: {exc!r}")))
        self._live.clear()
        return failed

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed under us: nobody is listening
            loop.call_soon_threadsafe(fn, *args)

    # -- loop side ----------------------------------------------------------------------------
    def _dispatch(self, results: list[tuple[str, RequestOutput | BaseException]]) -> None:
        for request_id, item in results:
            stream = self._streams.get(request_id)
            if stream is None:  # aborted by its consumer meanwhile
                continue
            if isinstance(item, BaseException):
                del self._streams[request_id]
                stream._fail(item)
                continue
            if item.finished:
                del self._streams[request_id]
            stream._record(item)
            if self.on_output is not None:
                try:
                    self.on_output(stream, item)
                except Exception:
                    logger.exception("output hook failed")
            stream._push(item)


def _take_snapshot(engine: LLMEngine) -> dict[str, Any]:
    return {**engine.cluster.stats(), "taken_at": time.monotonic()}


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
