"""``AsyncLLMEngine`` on its own: streams, cancellation, snapshots and shutdown, no HTTP."""

from __future__ import annotations

import asyncio

import pytest

from conftest import loaded_model
from infinite_llm import LLM, SamplingParams
from infinite_llm.config import CacheConfig, EngineConfig
from infinite_llm.llm_engine import LLMEngine
from infinite_llm.server.async_engine import AsyncLLMEngine, EngineDeadError, EngineOverloadedError

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def make_engine(num_blocks: int = 16, block_size: int = 4) -> LLMEngine:
    config = EngineConfig(
        model="tiny",
        num_instances=2,
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, lending_cap=0.5),
    )
    return LLMEngine(config, loaded_model("tiny"), progress=False)


def all_free(snap: dict) -> bool:
    return all(i["free"] == i["num_blocks"] for i in snap["instances"]) and snap["ledger"] == []


def test_streams_concatenate_to_the_offline_answers(offline_llm: LLM) -> None:
    prompts = [
        [7] * 70,
        [9] * 20,
        "hello",
    ]  # the first must borrow (16 rBlocks x 4 tokens per instance)

    async def main() -> list[str]:
        engine = AsyncLLMEngine(make_engine())
        engine.start()
        try:

            async def one(prompt) -> str:
                request = await engine.make_request(prompt, GREEDY)
                async with engine.generate(request) as stream:
                    return "".join([out.delta_text async for out in stream])

            texts = await asyncio.gather(*(one(p) for p in prompts))
            snap, fresh = await engine.cluster_snapshot()
            assert fresh and all_free(snap) and snap["blocks_borrowed"] > 0
            return texts
        finally:
            await engine.shutdown()

    expected = [o.outputs[0].text for o in offline_llm.generate(prompts, GREEDY, use_tqdm=False)]
    assert asyncio.run(main()) == expected


def test_cancelled_consumer_aborts_and_frees_every_instance() -> None:
    async def main() -> None:
        engine = AsyncLLMEngine(make_engine(num_blocks=40))
        engine.start()
        try:
            request = await engine.make_request(
                [5] * 200, SamplingParams(max_tokens=30, ignore_eos=True)
            )
            started = asyncio.Event()

            async def consume() -> None:
                async with engine.generate(request) as stream:
                    async for _ in stream:
                        started.set()

            task = asyncio.ensure_future(consume())
            await started.wait()
            snap, _ = await engine.cluster_snapshot()
            assert (
                sum(i["lent"] for i in snap["instances"]) > 0
            )  # 200 tokens > a pool of 40 x 4: borrowed
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert engine.num_running == engine.num_waiting == 0
            snap, _ = await engine.cluster_snapshot()
            assert all_free(snap)
            engine.engine.check_integrity()
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_waiting_limit_and_shutdown_fail_fast() -> None:
    async def main() -> None:
        engine = AsyncLLMEngine(make_engine(), max_waiting_requests=1)
        engine.start()
        long = SamplingParams(max_tokens=None, ignore_eos=True)
        a, b = [await engine.make_request(p, long) for p in ("a", "b")]
        first = engine.generate(a)
        with pytest.raises(EngineOverloadedError):  # "a" has no first token yet: it is waiting
            engine.generate(b)
        await engine.shutdown()
        with pytest.raises(EngineDeadError):
            async for _ in first:
                pass
        with pytest.raises(EngineDeadError):
            await engine.make_request("c", GREEDY)

    asyncio.run(main())


def _output(
    text: str, ids: list[int], delta_text: str, delta_ids: list[int], finished: bool = False
):
    from infinite_llm.outputs import CompletionOutput, RequestOutput

    completion = CompletionOutput(0, text, ids, finish_reason="length" if finished else None)
    return RequestOutput(
        "r", None, [1], [completion], finished, delta_text=delta_text, delta_token_ids=delta_ids
    )


def test_outputs_a_slow_consumer_missed_are_merged() -> None:
    from infinite_llm.server.async_engine import EngineStepError
    from infinite_llm.server.stream import RequestStream

    async def main() -> None:
        aborted: list[str] = []
        stream = RequestStream("r", [1], aborted.append)
        stream._push(_output("a", [5], "a", [5]))
        stream._push(_output("ab", [5, 6], "b", [6]))
        stream._push(_output("abc", [5, 6, 7], "c", [7]))
        merged = await stream.__anext__()
        assert (merged.outputs[0].text, merged.delta_text, merged.delta_token_ids) == (
            "abc",
            "abc",
            [5, 6, 7],
        )
        stream._push(_output("abcd", [5, 6, 7, 8], "d", [8]))
        stream._fail(EngineStepError("boom"))  # an error is never merged away
        assert (await stream.__anext__()).delta_text == "d"
        with pytest.raises(EngineStepError):
            await stream.__anext__()
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        stream.abort()
        assert aborted == []  # it had already ended: nothing to abort

    asyncio.run(main())


def test_pending_outputs_merge_per_sample() -> None:
    from infinite_llm.outputs import CompletionOutput, RequestOutput
    from infinite_llm.server.stream import RequestStream

    async def main() -> None:
        stream = RequestStream("r", [1, 2, 3], lambda rid: None)

        def sample(index: int, text: str, finished: bool = False) -> RequestOutput:
            completion = CompletionOutput(index, text, [len(text)])
            return RequestOutput("r", None, [1], [completion], finished, delta_text=text[-1])

        for out in (sample(0, "a"), sample(1, "x"), sample(0, "ab"), sample(1, "xy")):
            stream._push(out)
        final = RequestOutput(
            "r", None, [1], [CompletionOutput(0, "ab", []), CompletionOutput(1, "xy", [])], True
        )
        stream._push(final)
        got = [await stream.__anext__() for _ in range(3)]
        assert [(o.outputs[0].index, o.delta_text) for o in got[:2]] == [(0, "ab"), (1, "xy")]
        assert got[2] is final

    asyncio.run(main())
