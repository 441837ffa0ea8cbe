"""Soak test of the real server: minutes of load with bad uploads and stalled clients, as markdown tables.

    python benchmarks/serve_soak.py --data ../shared/data/cats_vs_dogs [--minutes 10] [--clients 32] [--workers 1]

The server (`catdogcnn serve`, shipped model, its default limits) runs in its own process on a free loopback
port. `--clients` clients (asyncio + httpx, one photo per request, on the same machine) post test_set photos; one
upload in ten (`--bad-share`) is bad, in turn: not an image (415), a truncated JPEG (422), over the upload limit
(413), a decompression bomb (413: too many pixels). `--stalled` more clients each send half an upload and then
nothing, again and again: the server must cut them off (408 after its request timeout) and keep serving the others.
A wrong answer is a good photo labelled otherwise than the same model labels it in this process, or a bad upload
answered with another status than the one above. Resident memory (the server and its workers) is sampled every 10
s: the end against the end of the first minute shows whether it grows.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from results_page import add_write_option, recorded  # a sibling script's helper

from catdogcnn.data import scan_folder
from catdogcnn.predict import load_classifier

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import png_with_size  # noqa: E402  (the tests' decompression bomb: a header, not the pixels)
from serve_load import start_server  # noqa: E402

OVERSIZE_MB = 11  # over the server's default 10 MB upload limit


def bad_uploads(jpeg: bytes) -> list[tuple[str, bytes, int]]:
    """(file name, bytes, expected status) of each kind of bad upload."""
    return [("notes.jpg", b"this is not a photo\n" * 50, 415), ("truncated.jpg", jpeg[: len(jpeg) // 3], 422),
            ("huge.jpg", b"\xff\xd8" + os.urandom(OVERSIZE_MB * 1_000_000), 413),
            ("bomb.png", png_with_size(40_000, 40_000), 413)]


def reference_photos(data: Path, model: str | None, count: int = 400) -> list[tuple[str, bytes, str]]:
    """`count` test_set photos spread over the folder: (name, bytes, the label the same model gives here)."""
    _, samples = scan_folder(data / "test_set")
    paths = [s.path for s in samples[:: max(1, len(samples) // count)][:count]]
    reference = load_classifier(model)
    return [(p.name, p.read_bytes(), pred.label) for p, pred in zip(paths, reference.predict_many(paths), strict=True)]


def resident_mb(pid: int) -> float:
    """Resident memory of a process and its children (uvicorn's workers), from /proc."""
    total = 0.0
    for p in [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]:
        status = Path(f"/proc/{p}/status").read_text().splitlines()
        total += int(next(line for line in status if line.startswith("VmRSS:")).split()[1]) / 1024
    return total


class Tally:
    def __init__(self) -> None:
        self.good_latencies: list[tuple[float, float]] = []  # (time since start, seconds)
        self.requests = self.wrong = self.server_errors = self.failures = self.stalled_cut = 0
        self.statuses: dict[int, int] = {}
        self.memory: list[tuple[float, float]] = []


async def client(index: int, url: str, photos: list[tuple[str, bytes, str]], bad: list[tuple[str, bytes, int]],
                 every: int, stop: float, started: float, tally: Tally, http: httpx.AsyncClient) -> None:
    i = index
    while time.perf_counter() < stop:
        i += 1
        is_bad = every and i % every == 0
        name, data, expected = bad[(i // every) % len(bad)] if is_bad else photos[i % len(photos)]
        sent = time.perf_counter()
        try:
            r = await http.post(f"{url}/v1/predict", files={"files": (name, data, "application/octet-stream")})
        except httpx.HTTPError:
            tally.failures += 1
            continue
        tally.requests += 1
        tally.statuses[r.status_code] = tally.statuses.get(r.status_code, 0) + 1
        tally.server_errors += r.status_code >= 500
        if is_bad:
            tally.wrong += r.status_code != expected
        elif r.status_code != 200 or r.json()["results"][0].get("label") != expected:
            tally.wrong += 1
        else:
            tally.good_latencies.append((sent - started, time.perf_counter() - sent))


async def stalled_client(url: str, photo: bytes, stop: float, tally: Tally) -> None:
    """Half an upload, then silence, until the server hangs up; again until the end."""
    request = httpx.Request("POST", f"{url}/v1/predict", files={"files": ("slow.jpg", photo, "image/jpeg")})
    body = request.read()
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: {request.url.netloc.decode()}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in request.headers.items() if k.lower() != "host") + "\r\n").encode()
    while time.perf_counter() < stop:
        reader, writer = await asyncio.open_connection(request.url.host, request.url.port)
        writer.write(head + body[: len(body) // 2])
        await writer.drain()
        try:
            answer = await asyncio.wait_for(reader.read(), max(0.1, stop - time.perf_counter()))
            tally.stalled_cut += answer.startswith(b"HTTP/1.1 408")
        except TimeoutError:
            pass
        writer.close()


async def soak(url: str, pid: int, photos, bad, args) -> Tally:
    tally = Tally()
    started = time.perf_counter()
    stop = started + args.minutes * 60

    async def sample_memory() -> None:
        while time.perf_counter() < stop:
            await asyncio.sleep(min(10.0, max(0.0, stop - time.perf_counter())))
            tally.memory.append((time.perf_counter() - started, resident_mb(pid)))

    every = round(1 / args.bad_share) if args.bad_share else 0
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        await asyncio.gather(sample_memory(),
                             *(stalled_client(url, photos[0][1], stop, tally) for _ in range(args.stalled)),
                             *(client(c, url, photos, bad, every, stop, started, tally, http)
                               for c in range(args.clients)))
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("CATDOGCNN_DATA",
                                                                         ROOT.parent / "shared/data/cats_vs_dogs")))
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--bad-share", type=float, default=0.1)
    parser.add_argument("--stalled", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1, help="server processes (serve --workers)")
    parser.add_argument("--model", help="bundle to serve (default: the shipped model)")
    add_write_option(parser)
    args = parser.parse_args()
    title = "Serving under load, with bad uploads and stalled clients (`benchmarks/serve_soak.py`)"
    with recorded(args.write, "serve_soak.py", title):

        photos = reference_photos(args.data, args.model)
        bad = bad_uploads(photos[0][1])
        server, url, cmd = start_server(["--workers", str(args.workers), *(["--model", args.model] if args.model
                                                                           else [])])
        try:
            load_before = os.getloadavg()[0]
            tally = asyncio.run(soak(url, server.pid, photos, bad, args))
            metrics = httpx.get(f"{url}/metrics", timeout=10).text
        finally:
            server.terminate()
            server.wait(timeout=60)

        latencies = np.array([seconds for _, seconds in tally.good_latencies]) * 1000
        first = next((mb for t, mb in tally.memory if t >= min(60, args.minutes * 60) - 1), tally.memory[0][1])
        end = tally.memory[-1][1]
        seconds = args.minutes * 60
        print(f"\nServer: {' '.join(cmd[1:])}; {os.cpu_count()} cores (clients on the same machine); load average "
              f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after; {args.minutes:g} min, "
              f"{args.clients} clients, {args.bad_share:.0%} bad uploads, {args.stalled} stalled clients\n")
        print("| requests | good photos/s | wrong answers | 5xx | failed connections | p50 good ms | p99 good ms | "
              "stalled uploads cut (408) | memory after 1 min MB | memory at the end MB | change |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        print(f"| {tally.requests} | {len(latencies) / seconds:.1f} | {tally.wrong} | {tally.server_errors} | "
              f"{tally.failures} | {np.percentile(latencies, 50):.0f} | {np.percentile(latencies, 99):.0f} | "
              f"{tally.stalled_cut} | {first:.0f} | {end:.0f} | {(end - first) / first:+.1%} |")
        print("\nStatuses: " + ", ".join(f"{code}: {n}" for code, n in sorted(tally.statuses.items())))
        print("\n| minute | good photos/s | p99 good ms | memory MB |")
        print("|---|---|---|---|")
        for minute in range(int(np.ceil(args.minutes))):
            these = [s * 1000 for t, s in tally.good_latencies if minute * 60 <= t < (minute + 1) * 60]
            mb = [m for t, m in tally.memory if t <= (minute + 1) * 60 + 1][-1]
            span = min(60, seconds - minute * 60)
            p99 = np.percentile(these, 99) if these else float("nan")
            print(f"| {minute + 1} | {len(these) / span:.1f} | {p99:.0f} | {mb:.0f} |")
        batches = [line for line in metrics.splitlines() if line.startswith(("catdogcnn_batch_photos_sum",
                                                                             "catdogcnn_batch_photos_count"))]
        if len(batches) == 2:
            total, count = (float(line.split()[-1]) for line in sorted(batches, reverse=True))
            print(f"\nThe server's /metrics: {count:.0f} model calls, {total / count:.1f} photos a call on average")


if __name__ == "__main__":
    main()
