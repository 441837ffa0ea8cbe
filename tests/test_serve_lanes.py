"""The decoding lanes: large photos one at a time at a lower priority, ordinary ones beside them."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time

from catdogcnn import serve_lanes


def test_large_photos_are_decoded_one_at_a_time_at_low_priority_and_ordinary_ones_pass_beside_them():
    started, niceness, peak = [], {}, {"large": 0, "all": 0}
    held, counting = dict(peak), threading.Lock()
    gate = threading.Event()  # holds the first large photo in its decoding

    def decode(name: str, large: bool) -> str:
        kinds = ("all", "large") if large else ("all",)
        with counting:
            started.append(name)
            if hasattr(os, "getpriority"):
                niceness[name] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            for kind in kinds:
                held[kind] += 1
                peak[kind] = max(peak[kind], held[kind])
        gate.wait(5) if name == "large" else time.sleep(0.01)
        with counting:
            for kind in kinds:
                held[kind] -= 1
        return name

    async def main() -> list[str]:
        lanes = serve_lanes.DecodeLanes(slots=2, large=100)
        first = asyncio.ensure_future(lanes.decode(1000, decode, "large", True))
        await asyncio.sleep(0.05)  # the first large photo is decoding
        rest = asyncio.gather(*(lanes.decode(1000, decode, f"large{i}", True) for i in range(2)),
                              *(lanes.decode(10, decode, f"small{i}", False) for i in range(10)))
        await asyncio.sleep(0.5)
        gate.set()
        answers = [await first, *await rest]
        lanes.close()
        return answers

    assert asyncio.run(main()) == ["large", "large0", "large1", *(f"small{i}" for i in range(10))]
    assert peak == {"large": 1, "all": 3}  # large photos one at a time, beside two ordinary ones at most
    # the ten ordinary photos went beside the first large one, before the large ones that came with them
    assert started[0] == "large" and all(name.startswith("small") for name in started[1:11])
    if sys.platform.startswith("linux"):
        assert niceness["large"] == niceness["large0"] == min(19, niceness["small0"] + serve_lanes.LARGE_PHOTO_NICENESS)


def test_large_photos_past_those_in_hand_are_turned_away_not_queued():
    gate = threading.Event()

    async def main() -> list:
        lanes = serve_lanes.DecodeLanes(slots=2, large=100, large_in_hand=2)
        held = [asyncio.ensure_future(lanes.decode(1000, gate.wait, 5)) for _ in range(2)]
        await asyncio.sleep(0.05)
        answers = await asyncio.gather(lanes.decode(1000, gate.wait, 5), lanes.decode(10, time.sleep, 0),
                                       return_exceptions=True)
        gate.set()
        await asyncio.gather(*held)
        again = await lanes.decode(1000, gate.wait, 5)  # room again once they are done
        lanes.close()
        return [*answers, again]

    turned_away, ordinary, again = asyncio.run(main())
    assert isinstance(turned_away, serve_lanes.LaneFullError) and ordinary is None and again is True
