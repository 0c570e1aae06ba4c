"""``/dashboard`` in headless Chromium while long prompts borrow: the page must draw each
instance's rBlock grid in the owners' colours, lent blocks included, and the debt graph; once
they are done, the rBlocks their prompts left in the prefix cache in a colour of their own.

Chromium comes from Debian (``make test-deps``); the test skips, saying so, only when absent.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import matplotlib.image
import numpy as np
import pytest

from infinite_llm.server.dashboard import CACHED_COLOUR, FREE_COLOUR, PALETTE

from .helpers import ServerProcess, cluster, wait_clean

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=2500",
    "--window-size=1100,800",
]
GRID_CELL = 22  # the page's cell for a 16-block pool (6 columns, 440 px at most, 22 px cap), gap 2


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(
        "Chromium is not installed (run `make test-deps`, or apt-get install chromium chromium-driver)"
    )


def run_chromium(url: str, tmp: Path, *args: str) -> tuple[bytes, bytes]:
    """Run headless Chromium once; its own process group, all of it killed on a timeout
    (``/usr/bin/chromium`` is a shell script: killing it alone would leave the browser)."""
    cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'profile'}", *args, url]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        return proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise


class Workload:
    """Clients sending prompts too long for one pool (16 x 4 tokens) until stopped."""

    def __init__(self, base_url: str, num_clients: int = 3) -> None:
        self.base_url = base_url
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True)
            for i in range(num_clients)
        ]
        for t in self.threads:
            t.start()

    def _client(self, i: int) -> None:
        with httpx.Client(base_url=self.base_url, timeout=60) as client:
            while not self.stop.is_set():
                r = client.post(
                    "/v1/completions",
                    json={
                        "prompt": [10 + i] * 72,
                        "max_tokens": 16,
                        "ignore_eos": True,
                        "temperature": 0,
                    },
                )
                if r.status_code != 200:
                    self.errors.append(r.text)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def rgb(hex_colour: str) -> tuple[int, int, int]:
    return int(hex_colour[1:3], 16), int(hex_colour[3:5], 16), int(hex_colour[5:7], 16)


def find_blocks(image: np.ndarray, colour: str, side: int) -> list[tuple[int, int]]:
    """Top-left corners of solid squares of ``colour`` whose side is within 3 px of ``side``
    (a lent block's black outline eats its edge); circles and swatches do not qualify."""
    mask = np.all(image[:, :, :3] == rgb(colour), axis=2)
    padded = np.pad(mask, 1)
    corners = np.argwhere(mask & ~padded[:-2, 1:-1] & ~padded[1:-1, :-2])
    found = []
    for y, x in corners:
        width = _run(mask[y, x:])
        height = _run(mask[y:, x])
        if (
            width == height
            and side - 3 <= width <= side
            and mask[y : y + height, x : x + width].all()
        ):
            found.append((int(y), int(x)))
    return found


def _run(line: np.ndarray) -> int:
    off = np.flatnonzero(~line)
    return int(off[0]) if off.size else len(line)


def blocks_by_panel(image: np.ndarray, num_instances: int) -> list[dict[str, int]]:
    """Per instance panel (left to right), how many blocks of each colour it shows."""
    side = GRID_CELL - 2
    colours = {
        "free": FREE_COLOUR,
        "cached": CACHED_COLOUR,
        **{str(i): PALETTE[i] for i in range(num_instances)},
    }
    blocks = [(x, name) for name, c in colours.items() for _, x in find_blocks(image, c, side)]
    blocks.sort()
    panels: list[dict[str, int]] = []
    last_x = None
    for x, name in blocks:
        if (
            last_x is None or x - last_x > 3 * GRID_CELL
        ):  # a gap wider than a grid column: next panel
            panels.append({})
        panels[-1][name] = panels[-1].get(name, 0) + 1
        last_x = x
    return panels


def lent_in_dom(dom: str) -> list[tuple[int, int]]:
    """(instance, owner) for every block the page drew as lent to another instance's request."""
    lent = []
    for instance, body in re.findall(
        r'<svg[^>]*data-instance="(\d+)"[^>]*>(.*?)</svg>', dom, flags=re.S
    ):
        for owner in re.findall(r'data-owner="(\d+)"', body):
            if owner != instance:
                lent.append((int(instance), int(owner)))
    return lent


def cached_in_dom(dom: str) -> dict[int, set[int]]:
    """Per instance, the rBlocks the page drew as cached (rects are in block id order)."""
    return {
        int(instance): {
            b
            for b, owner in enumerate(re.findall(r'data-owner="(\w+)"', body))
            if owner == "cached"
        }
        for instance, body in re.findall(
            r'<svg[^>]*data-instance="(\d+)"[^>]*>(.*?)</svg>', dom, flags=re.S
        )
    }


def test_dashboard_draws_blocks_and_borrowing_live(
    small_server: ServerProcess, tmp_path: Path
) -> None:
    chromium()
    page = httpx.get(small_server.base_url + "/dashboard")
    assert page.status_code == 200 and "http://" not in page.text.replace(
        "http://www.w3.org", ""
    )  # no CDN
    workload = Workload(small_server.base_url)
    try:
        deadline = time.monotonic() + 30
        while not any(i["lent"] for i in cluster(small_server.base_url)["instances"]):
            assert time.monotonic() < deadline, "the workload never borrowed"
            time.sleep(0.05)
        url = small_server.base_url + "/dashboard?interval=200"
        seen_lent_dom = seen_lent_pixels = False
        for attempt in range(6):  # the page shows one instant: try until it caught a loan
            dom = run_chromium(url, tmp_path, "--dump-dom")[0].decode()
            assert dom.count("<rect") >= 32, dom[:2000]  # 2 pools x 16 rBlocks
            assert 'id="graph"' in dom and "<circle" in dom
            seen_lent_dom |= bool(lent_in_dom(dom))
            shot = tmp_path / f"shot{attempt}.png"
            _, stderr = run_chromium(url, tmp_path, f"--screenshot={shot}")
            assert shot.exists(), stderr.decode()[-2000:]
            image = np.round(matplotlib.image.imread(shot) * 255).astype(np.int64)
            panels = blocks_by_panel(image, 2)
            # Both grids drawn whole (free + owned blocks), whatever the instant shows.
            assert len(panels) == 2 and all(sum(p.values()) >= 12 for p in panels), panels
            # A block of instance 1's request in instance 0's grid, or the other way round.
            seen_lent_pixels |= panels[0].get("1", 0) > 0 or panels[1].get("0", 0) > 0
            if seen_lent_dom and seen_lent_pixels:
                break
        assert seen_lent_dom, "no lent rBlock in the page's DOM"
        assert seen_lent_pixels, f"no block of another instance's colour in a grid: {panels}"
    finally:
        workload.close()
    assert not workload.errors, workload.errors[:3]
    snap = wait_clean(small_server.base_url)
    # The clients repeated their prompts: what the last ones left stays cached, drawn as such.
    cached = {i["instance_id"]: set(i["cached_block_ids"]) for i in snap["instances"]}
    assert [len(c) for c in cached.values()] == [i["cached"] for i in snap["instances"]]
    assert any(cached.values()), "the repeated prompts left no rBlock cached"
    url = small_server.base_url + "/dashboard"
    assert cached_in_dom(run_chromium(url, tmp_path, "--dump-dom")[0].decode()) == cached
    shot = tmp_path / "cached.png"
    run_chromium(url, tmp_path, f"--screenshot={shot}")
    panels = blocks_by_panel(np.round(matplotlib.image.imread(shot) * 255).astype(np.int64), 2)
    assert [p.get("cached", 0) for p in panels] == [len(c) for c in cached.values()], panels
