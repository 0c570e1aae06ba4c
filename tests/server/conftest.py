"""Fixtures of the server tests: real ``serve`` subprocesses on the tiny model, and the offline
``LLM`` on the same weights whose greedy answers the server must reproduce."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from conftest import loaded_model
from infinite_llm import LLM

from .helpers import ServerProcess

# The main test server: room for long generations (disconnect tests) and a configured max length.
TINY_ARGS = [
    "--model",
    "tiny",
    "--num-instances",
    "2",
    "--kv-blocks",
    "256",
    "--block-size",
    "8",
    "--max-model-len",
    "2048",
]
# Small pools (2 x 16 rBlocks of 4 tokens): any prompt past 64 tokens must borrow.
SMALL_ARGS = [
    "--model",
    "tiny",
    "--num-instances",
    "2",
    "--kv-blocks",
    "16",
    "--block-size",
    "4",
    "--lending-cap",
    "0.5",
]
SMALL_MAX_MODEL_LEN = 96  # 16 local + 8 lendable rBlocks (lending cap 0.5), 4 tokens each


SERVER_ARGS = {
    "tiny_server": TINY_ARGS,
    "small_server": SMALL_ARGS,
    "smollm2_server": [],
}  # []: `make serve`


@pytest.fixture(scope="package", autouse=True)
def _servers(request: pytest.FixtureRequest) -> Iterator[dict[str, ServerProcess]]:
    """Start, at once and in parallel, every server the selected tests will use."""
    wanted = {
        name
        for item in request.session.items
        for name in getattr(item, "fixturenames", ())
        if name in SERVER_ARGS
    }
    servers = {name: ServerProcess(SERVER_ARGS[name], wait=False) for name in sorted(wanted)}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="package")
def tiny_server(_servers: dict[str, ServerProcess]) -> ServerProcess:
    return _servers["tiny_server"].wait_ready()


@pytest.fixture(scope="package")
def small_server(_servers: dict[str, ServerProcess]) -> ServerProcess:
    return _servers["small_server"].wait_ready()


@pytest.fixture(scope="package")
def smollm2_server(_servers: dict[str, ServerProcess]) -> ServerProcess:
    return _servers["smollm2_server"].wait_ready()


@pytest.fixture(scope="package")
def offline_llm() -> LLM:
    """The offline API on the same weights (greedy answers do not depend on the pool layout)."""
    return LLM(
        "tiny",
        loaded_model=loaded_model("tiny"),
        kv_blocks_per_instance=512,
        block_size=8,
        max_model_len=2048,
        progress=False,
    )
