"""Serving under load: `mixer-lite serve` against the same model and index called in-process.

    python bench/serve.py --run runs/demo --data data/synth-small-scenes30 \
        [--clients 1,8,32,128] [--seconds 10] [--max-requests 3000] [--soak 60]

1. In-process, the limit: the run's test photos (file bytes) decoded, embedded and searched in
   batches of ``--batch`` with the same :class:`~mixer_lite.service.SearchService` the server
   uses, at the same torch thread count: photos per second, and each phase's share.
2. Served: ``mixer-lite serve`` in a subprocess; for each client count a closed loop on
   localhost (each client posts one photo, waits for the answer, posts the next), bounded by
   ``--seconds`` and ``--max-requests``: QPS, p50/p95/p99 latency from the client's side, errors,
   and the share of server time in decode, queue, embed and search (from ``/metrics``).
3. Soak: ``--soak`` seconds at 32 clients; the server's resident memory at start and end.

The clients (aiohttp, asyncio) run in this process on the same cores as the server: what they
spend is taken from the server, so served QPS is a lower bound on a machine of its own.
"""
from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import psutil

from mixer_lite.service import SearchService


def in_process(service: SearchService, photos: list[bytes], batch: int, k: int) -> dict:
    """Photos per second through decode -> embed -> search, in batches, and the phase times."""
    spent = {"decode": 0.0, "embed": 0.0, "search": 0.0}
    service.search_batch(np.stack([service.decode(p, "warm-up") for p in photos[:batch]]), k)
    t0 = time.perf_counter()
    for lo in range(0, len(photos), batch):
        t = time.perf_counter()
        pixels = np.stack([service.decode(p, "photo") for p in photos[lo:lo + batch]])
        spent["decode"] += time.perf_counter() - t
        out = service.search_batch(pixels, k)
        spent["embed"] += out["embed_s"]
        spent["search"] += out["search_s"]
    wall = time.perf_counter() - t0
    return {"photos_per_s": len(photos) / wall, "spent": spent}


def phase_seconds(client: httpx.Client) -> dict:
    text = client.get("/metrics").text
    return {p: float(s) for p, s in re.findall(r'phase="(\w+)"\} ([\d.]+)', text)}


async def closed_loop(url: str, photos: list[bytes], clients: int, seconds: float,
                      max_requests: int, k: int) -> dict:
    """``clients`` concurrent posters, each waiting for its answer before the next post."""
    latencies, errors, sent = [], 0, 0
    stop_at = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(url, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def one_client(i: int):
            nonlocal errors, sent
            while time.perf_counter() < stop_at and sent < max_requests:
                form = aiohttp.FormData()
                form.add_field("k", str(k))
                form.add_field("image", photos[(sent + i) % len(photos)], filename="photo.jpg",
                               content_type="image/jpeg")
                sent += 1
                t = time.perf_counter()
                try:
                    async with session.post("/search", data=form) as r:
                        await r.read()
                        ok = r.status == 200
                except aiohttp.ClientError:
                    ok = False
                latencies.append(time.perf_counter() - t)
                errors += not ok

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(i) for i in range(clients)))
        wall = time.perf_counter() - t0
    ms = np.array(latencies) * 1000
    return {"clients": clients, "requests": len(ms), "qps": len(ms) / wall, "errors": errors,
            "p50": np.percentile(ms, 50), "p95": np.percentile(ms, 95),
            "p99": np.percentile(ms, 99)}


def start_server(run: str, data: str, port: int, threads: int, window_ms: float):
    proc = subprocess.Popen([sys.executable, "-m", "mixer_lite.cli", "serve", "--run", run,
                             "--data", data, "--port", str(port), f"--threads={threads}",
                             f"--batch-window-ms={window_ms}"])
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"mixer-lite serve exited with {proc.returncode}")
        try:
            httpx.get(url + "/healthz", timeout=1)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit("mixer-lite serve did not answer within 120 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--data", default="data/synth-small-scenes30")  # make demo's
    ap.add_argument("--clients", default="1,8,32,128")
    ap.add_argument("--seconds", type=float, default=10.0, help="per client count")
    ap.add_argument("--max-requests", type=int, default=3000, help="per client count")
    ap.add_argument("--soak", type=float, default=60.0, help="seconds at 32 clients (0: none)")
    ap.add_argument("--batch", type=int, default=32, help="in-process batch size")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in-process")
    ap.add_argument("--server-threads", type=int, default=2, help="torch threads of the server")
    ap.add_argument("--window-ms", type=float, default=2.0, help="the server's batch window")
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args()

    service = SearchService(args.run, args.data, threads=args.threads, progress=False)
    photos = [Path(service.query_paths[service.query_row(q)]).read_bytes()
              for q in service.test_queries]
    base = in_process(service, photos * 2, args.batch, args.k)
    total = sum(base["spent"].values())
    print(f"in-process, batches of {args.batch}, {args.threads} threads: "
          f"{base['photos_per_s']:.0f} photos/s (" + ", ".join(
              f"{p} {s / total:.0%}" for p, s in base["spent"].items()) + ")")
    del service

    proc, url = start_server(args.run, args.data, args.port, args.server_threads,
                             args.window_ms)
    try:
        with httpx.Client(base_url=url) as client:
            asyncio.run(closed_loop(url, photos, 8, 2.0, 200, args.k))  # warm-up
            print("\n| clients | requests | QPS | x in-process | p50 ms | p95 ms | p99 ms | "
                  "errors | decode | queue | embed | search |")
            print("|---|---|---|---|---|---|---|---|---|---|---|---|")
            for c in [int(x) for x in args.clients.split(",")]:
                before = phase_seconds(client)
                r = asyncio.run(closed_loop(url, photos, c, args.seconds, args.max_requests,
                                            args.k))
                after = phase_seconds(client)
                spent = {p: after[p] - before[p] for p in after}
                share = " | ".join(f"{spent[p] / sum(spent.values()):.0%}"
                                   for p in ("decode", "queue", "embed", "search"))
                print(f"| {c} | {r['requests']} | {r['qps']:.0f} | "
                      f"{r['qps'] / base['photos_per_s']:.2f} | {r['p50']:.1f} | {r['p95']:.1f} | "
                      f"{r['p99']:.1f} | {r['errors']} | {share} |", flush=True)
            if args.soak > 0:
                server = psutil.Process(proc.pid)
                start_mb = server.memory_info().rss / 2 ** 20
                r = asyncio.run(closed_loop(url, photos, 32, args.soak, 10 ** 9, args.k))
                end_mb = server.memory_info().rss / 2 ** 20
                print(f"\nsoak: {args.soak:.0f} s at 32 clients, {r['requests']} requests, "
                      f"{r['errors']} errors, {r['qps']:.0f} QPS, p99 {r['p99']:.1f} ms; server "
                      f"memory {start_mb:.0f} -> {end_mb:.0f} MiB ({end_mb / start_mb - 1:+.1%})")
    finally:
        proc.send_signal(2)
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
