"""Where the server decodes uploaded photos: ordinary ones a few at a time, large ones one at a time in a thread
of lower CPU priority, so that a photo at the pixel cap never holds up the ordinary ones behind it."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from catdogcnn.extras import needs_extra

with needs_extra("serve"):
    from starlette.concurrency import run_in_threadpool

log = logging.getLogger("catdogcnn")
T = TypeVar("T")
LARGE_PHOTO_PIXELS = 4_000_000  # decoded (a phone's 12 MP JPEG decodes at 1/8 scale): over this, one at a time
LARGE_PHOTO_NICENESS = 10  # a busy thread at nice +10 gets about a tenth of the time of one at +0


def lower_priority(by: int = LARGE_PHOTO_NICENESS) -> None:
    """Lower the CPU priority of the calling thread alone (Linux, where a thread has a nice value of its own)."""
    if sys.platform.startswith("linux"):
        thread = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + by))
        except OSError as e:  # large photos are then decoded at the priority of the rest, never refused for it
            log.warning("large photos decoded at normal priority: %s", e)


class LaneFullError(Exception):
    """As many large photos are in hand as the server takes: this one is turned away (503), not queued."""


class DecodeLanes:
    """Ordinary photos are decoded `slots` at a time; those over `large` decoded pixels one at a time, in a thread of
    lower CPU priority, with at most `large_in_hand` of them decoding or waiting (more are turned away): a photo at
    a 40 MP cap takes ~300 MB and most of a second of a core to decode, so under load it gets the time ordinary
    photos leave, and memory for decoding stays under one photo at the cap plus `slots` ordinary ones."""

    def __init__(self, slots: int, large: int = LARGE_PHOTO_PIXELS, large_in_hand: int = 4):
        self.large, self.large_in_hand, self.large_now = large, large_in_hand, 0
        self._slots = asyncio.Semaphore(slots)
        self._large_thread = ThreadPoolExecutor(1, "catdogcnn-large-photos", initializer=lower_priority)

    async def decode(self, pixels: int, decode: Callable[..., T], *args: Any) -> T:
        if pixels > self.large:
            if self.large_now >= self.large_in_hand:
                raise LaneFullError(f"{self.large_now} large photos in hand")
            self.large_now += 1
            job = asyncio.get_running_loop().run_in_executor(self._large_thread, decode, *args)
            job.add_done_callback(self._large_done)  # when the decode ends, not when a client that left stops waiting
            return await asyncio.shield(job)
        async with self._slots:
            return await run_in_threadpool(decode, *args)

    def _large_done(self, job: asyncio.Future) -> None:
        self.large_now -= 1
        if not job.cancelled():
            job.exception()  # seen here: a failure whose client has left is not reported as never retrieved

    def close(self) -> None:
        self._large_thread.shutdown(wait=False, cancel_futures=True)
