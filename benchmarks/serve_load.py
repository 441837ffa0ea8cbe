"""Load on the real server: N concurrent clients posting real photos for a fixed time, as a markdown table.

    python benchmarks/serve_load.py --data ../shared/data/cats_vs_dogs [--clients 1 8 32] [--seconds 30]

The server (`catdogcnn serve`, shipped model) runs in its own process on a free loopback port; the
clients run here (asyncio + httpx), one photo per request, so on a 2-core machine they compete with the
server for the CPU. The levels run twice: the server's memory after each round shows whether it grows.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from catdogcnn.data import scan_folder

ROOT = Path(__file__).resolve().parents[1]


def memory_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


async def load(url: str, photos: list[tuple[str, bytes]], clients: int, seconds: float) -> dict:
    latencies, errors, statuses = [], 0, {}
    stop = time.perf_counter() + seconds

    async def client(worker: int, http: httpx.AsyncClient) -> None:
        nonlocal errors
        i = worker
        while time.perf_counter() < stop:
            name, data = photos[i % len(photos)]
            i += clients
            started = time.perf_counter()
            try:
                r = await http.post(f"{url}/v1/predict", files={"files": (name, data, "image/jpeg")})
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code != 200 or r.json()["results"][0].get("error"):
                    errors += 1
            except httpx.HTTPError:
                errors += 1
            latencies.append(time.perf_counter() - started)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(w, http) for w in range(clients)))
        elapsed = time.perf_counter() - started
    return {"requests": len(latencies), "rps": len(latencies) / elapsed, "errors": errors,
            "p50": float(np.percentile(latencies, 50)) * 1000, "p99": float(np.percentile(latencies, 99)) * 1000}


def start_server(options: list[str]) -> tuple[subprocess.Popen, str, list[str]]:
    """`catdogcnn serve` with `options` on a free loopback port, once it answers: (process, URL, command)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "catdogcnn", "serve", "--port", str(port), *options]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(480):
        try:
            if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.25)
    return server, url, cmd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("CATDOGCNN_DATA",
                                                                         ROOT.parent / "shared/data/cats_vs_dogs")))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", help="bundle to serve (default: the shipped model)")
    parser.add_argument("--max-batch", type=int, help="the server's micro-batch limit (default: its own)")
    args = parser.parse_args()

    _, samples = scan_folder(args.data / "test_set")
    photos = [(s.path.name, s.path.read_bytes()) for s in samples[:400]]
    options = (["--model", args.model] if args.model else []) + (["--max-batch", str(args.max_batch)]
                                                                 if args.max_batch else [])
    server, url, cmd = start_server(options)
    try:
        rows, memory = [], []
        load_before = os.getloadavg()[0]
        for round_ in range(1, args.rounds + 1):
            for clients in args.clients:
                result = asyncio.run(load(url, photos, clients, args.seconds))
                rows.append((round_, clients, result))
            memory.append(memory_mb(server.pid))
    finally:
        server.terminate()
        server.wait(timeout=10)

    print(f"\nServer: {' '.join(cmd[1:])}; {os.cpu_count()} cores (clients on the same machine); "
          f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; {args.seconds:g} s a level\n")
    print("| round | clients | requests | photos/s | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for round_, clients, r in rows:
        print(f"| {round_} | {clients} | {r['requests']} | {r['rps']:.1f} | {r['p50']:.0f} | {r['p99']:.0f} | "
              f"{r['errors']} |")
    for round_, (rss, peak) in enumerate(memory, 1):
        print(f"\nServer memory after round {round_}: {rss:.0f} MB resident, {peak:.0f} MB peak", end="")
    print()


if __name__ == "__main__":
    main()
