"""Hostile clients beside good ones: the real server must stay within its memory budget and keep serving.

    python benchmarks/hostile_clients.py --data ../shared/data/cats_vs_dogs [--minutes 5] [--clients 32]
        [--budget-mb 1024] [--write docs/results.md]

The server (`catdogcnn serve`, shipped model, its default limits: 40 MP a photo, 10 MB a photo, 32 photos a
request) runs in its own process on a free loopback port. `--clients` good clients post test_set photos, one a
request, and must get the label the same model gives in this process. Beside them, one attacker of each kind
sends, again and again:

- a palette PNG of 39.9 MP (9 kB) and a 16-bit grey PNG of 36 MP (a few kB): photos just under the pixel cap,
  which the server decodes (200);
- a PNG whose header claims 42 MP (413, refused from the header);
- a chunked upload of 400 MB in one part, with no Content-Length (413 once the part passes a photo's limit of
  10 MB, or 408 when that is not reached within the request timeout of 30 s: either way the server stops
  reading);
- a request of 1,000 parts of a few bytes each (413 at the 33rd part);
- a connection whose headers come a byte a second (`--slow` of them at once), as a slowloris client does.

A wrong answer is a good photo labelled otherwise, or an attack answered with another status than the one
above. The server's peak resident memory (VmHWM, from /proc) must stay under `--budget-mb`, good clients' p99
under 1 s, with no 5xx.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from results_page import add_write_option, recorded  # sibling scripts' helpers
from serve_load import start_server
from serve_soak import Tally, client, reference_photos

ROOT = Path(__file__).resolve().parents[1]
FLOOD_MB, PARTS = 400, 1000  # the flood: past a photo's limit (10 MB) and the request's (321 MB)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def big_photos() -> dict[str, tuple[bytes, int]]:
    """name -> (PNG bytes, the status the server must answer)."""
    over = Image.new("P", (7000, 6000))
    return {"palette-39.9MP.png": (png(Image.new("P", (6320, 6320), 3)), 200),
            "grey16-36MP.png": (png(Image.fromarray(np.full((6000, 6000), 40000, np.uint16))), 200),
            "claims-42MP.png": (png(over), 413)}


def peak_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) / 1024


def resident_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmRSS:")).split()[1]) / 1024


class Attacks:
    def __init__(self) -> None:
        self.sent: dict[str, int] = {}
        self.wrong: dict[str, Counter] = {}  # kind -> the statuses answered otherwise (None: no answer)
        self.server_errors = 0

    def record(self, kind: str, status: int | None, expected: int | tuple[int, ...]) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + 1
        wrong = self.wrong.setdefault(kind, Counter())
        if status not in (expected if isinstance(expected, tuple) else (expected,)):
            wrong[status] += 1
        self.server_errors += status is not None and status >= 500

    def count_wrong(self) -> int:
        return sum(sum(statuses.values()) for statuses in self.wrong.values())

    def otherwise(self, kind: str) -> str:
        statuses = self.wrong.get(kind, Counter())
        seen = ", ".join(f"{'no answer' if status is None else status}: {n}" for status, n in statuses.most_common())
        return f"{sum(statuses.values())}" + (f" ({seen})" if seen else "")


async def read_status(reader: asyncio.StreamReader, timeout: float) -> int | None:
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
        return int(line.split()[1]) if line.startswith(b"HTTP/1.1") else None
    except (TimeoutError, ConnectionError, ValueError, IndexError):
        return None


async def big_photo_attacker(url: str, name: str, data: bytes, expected: int, stop: float,
                             attacks: Attacks, http: httpx.AsyncClient) -> None:
    while time.perf_counter() < stop:
        try:
            r = await http.post(f"{url}/v1/predict", files={"files": (name, data, "image/png")})
            status = r.status_code
        except httpx.HTTPError:
            status = None
        attacks.record(name, status, expected)


async def raw_attacker(url: str, kind: str, stop: float, attacks: Attacks) -> None:
    """A chunked flood or a many-part request over a raw connection: the answer must come before the body ends."""
    host, port = url.removeprefix("http://").split(":")
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
            "Content-Type: multipart/form-data; boundary=xyz\r\n\r\n").encode()
    part = b'--xyz\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n\r\nab\r\n'
    if kind == "chunked flood":
        opening = b'--xyz\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n\r\n'
        pieces = [opening] + [b"\0" * 65536] * (FLOOD_MB * 16)
    else:
        pieces = [part] * PARTS
    while time.perf_counter() < stop:
        reader, writer = await asyncio.open_connection(host, int(port))
        answer = asyncio.create_task(read_status(reader, 60))
        writer.write(head)
        try:
            for piece in pieces:
                if answer.done():  # answered: stop sending
                    break
                writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                await writer.drain()
        except ConnectionError:
            pass  # the server closed the connection after answering
        finally:
            status = await answer
            writer.close()
        attacks.record(kind, status, (413, 408) if kind == "chunked flood" else 413)


async def slow_headers(url: str, stop: float, attacks: Attacks) -> None:
    """Headers a byte a second, for as long as the server keeps the connection open."""
    host, port = url.removeprefix("http://").split(":")
    request = f"GET /v1/health HTTP/1.1\r\nHost: {host}\r\nX-Padding: {'a' * 4000}\r\n\r\n".encode()
    while time.perf_counter() < stop:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for byte in request:
                if time.perf_counter() >= stop:
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(1)
        except ConnectionError:
            pass
        finally:
            writer.close()
        attacks.sent["slow headers"] = attacks.sent.get("slow headers", 0) + 1


async def run(url: str, pid: int, photos, big, args) -> tuple[Tally, Attacks, list[float]]:
    tally, attacks, memory = Tally(), Attacks(), []
    started = time.perf_counter()
    stop = started + args.minutes * 60

    async def sample_memory() -> None:
        while time.perf_counter() < stop:
            memory.append(resident_mb(pid))
            await asyncio.sleep(1)

    limits = httpx.Limits(max_connections=args.clients + len(big), max_keepalive_connections=args.clients + len(big))
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        await asyncio.gather(
            sample_memory(),
            *(client(c, url, photos, [], 0, stop, started, tally, http) for c in range(args.clients)),
            *(big_photo_attacker(url, name, data, status, stop, attacks, http)
              for name, (data, status) in big.items()),
            raw_attacker(url, "chunked flood", stop, attacks), raw_attacker(url, "1,000 parts", stop, attacks),
            *(slow_headers(url, stop, attacks) for _ in range(args.slow)))
    return tally, attacks, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("CATDOGCNN_DATA",
                                                                         ROOT.parent / "shared/data/cats_vs_dogs")))
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--slow", type=int, default=20, help="slow-header connections held at once")
    parser.add_argument("--budget-mb", type=float, default=1024)
    parser.add_argument("--model", help="bundle to serve (default: the shipped model)")
    add_write_option(parser)
    args = parser.parse_args()
    title = "Hostile clients beside good ones (`benchmarks/hostile_clients.py`)"
    with recorded(args.write, "hostile_clients.py", title):
        photos = reference_photos(args.data, args.model)
        big = big_photos()
        server, url, cmd = start_server(["--model", args.model] if args.model else [])
        try:
            idle_mb = resident_mb(server.pid)
            load_before = os.getloadavg()[0]
            tally, attacks, memory = asyncio.run(run(url, server.pid, photos, big, args))
            peak = peak_mb(server.pid)
            alive = httpx.get(f"{url}/v1/health", timeout=10).status_code
        finally:
            server.terminate()
            server.wait(timeout=60)

        latencies = np.array([seconds for _, seconds in tally.good_latencies]) * 1000
        seconds = args.minutes * 60
        p99 = np.percentile(latencies, 99)
        verdict = all([peak <= args.budget_mb, p99 <= 1000, tally.wrong == 0, attacks.count_wrong() == 0,
                       tally.server_errors + attacks.server_errors == 0, alive == 200])
        print(f"\nServer: {' '.join(cmd[1:])}; {os.cpu_count()} cores (every client on the same machine); load "
              f"average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; {args.minutes:g} min, "
              f"{args.clients} good clients, {args.slow} slow-header connections; memory budget "
              f"{args.budget_mb:.0f} MB\n")
        print("| good requests | good photos/s | p50 good ms | p99 good ms | wrong answers (good, attacks) | 5xx | "
              "server memory idle MB | peak MB | end MB | health after | within budget, p99 <= 1 s, no 5xx |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        print(f"| {len(latencies)} | {len(latencies) / seconds:.1f} | {np.percentile(latencies, 50):.0f} | "
              f"{p99:.0f} | {tally.wrong}, {attacks.count_wrong()} | "
              f"{tally.server_errors + attacks.server_errors} | {idle_mb:.0f} | {peak:.0f} | {memory[-1]:.0f} | "
              f"{alive} | {'yes' if verdict else 'NO'} |")
        print("\n| attack | expected | sent | answered otherwise |")
        print("|---|---|---|---|")
        expected = {name: status for name, (_, status) in big.items()}
        expected |= {"chunked flood": "413 or 408", "1,000 parts": 413, "slow headers": "-"}
        for kind, count in attacks.sent.items():
            print(f"| {kind} | {expected[kind]} | {count} | {attacks.otherwise(kind)} |")


if __name__ == "__main__":
    main()
