"""`unembed serve` under concurrent clients: captions/s and p50 / p99 latency at 1, 4 and 16 clients,
dynamic batching (--max-batch 32 --max-wait-ms 10) against --max-batch 1, in one run, with the bundle's
default decoder (clipcap) on scenes images, one image per request. Every answer is checked against
what `unembed caption` prints for that image.

    python benchmarks/serve_speed.py --out benchmarks/results/serve_speed_cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "unembed.cli", "serve", "--decoder", "clipcap", "--port", str(port),
                             "--max-batch", str(max_batch), "--max-wait-ms", "10", "--device", "cpu"],
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("the server did not start")


def load(url: str, images: list[Path], clients: int, per_client: int, expected: dict) -> dict:
    def client(c: int) -> list[float]:
        latencies = []
        with httpx.Client(timeout=300) as http:
            for r in range(per_client):
                path = images[(c * per_client + r) % len(images)]
                t0 = time.perf_counter()
                response = http.post(f"{url}/caption", files={"file": (path.name, path.read_bytes(), "image/png")})
                latencies.append(time.perf_counter() - t0)
                assert response.status_code == 200 and response.json()[0]["caption"] == expected[path.name]
        return latencies

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = sorted(x for part in pool.map(client, range(clients)) for x in part)
    seconds = time.perf_counter() - t0
    return {"clients": clients, "requests": len(latencies), "captions_per_s": round(len(latencies) / seconds, 1),
            "p50_ms": round(1000 * statistics.median(latencies), 1),
            "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/serve_speed_cpu.json")
    parser.add_argument("--work", default="bench-run/serve")
    parser.add_argument("--requests", type=int, default=400, help="requests per client count")
    args = parser.parse_args()
    from unembed.data.scenes import write_scenes

    work = Path(args.work)
    if not (work / "scenes" / "test" / "captions.json").is_file():
        write_scenes(work / "scenes", n=8, n_eval=64, seed=5)
    images = sorted((work / "scenes" / "test" / "images").glob("*.png"))
    out = work / "cli.jsonl"
    subprocess.run([sys.executable, "-m", "unembed.cli", "caption", *map(str, images), "--decoder", "clipcap", "--out",
                    str(out), "--device", "cpu"], check=True, capture_output=True)
    expected = {Path(r["file"]).name: r["caption"] for r in map(json.loads, out.read_text().splitlines())}
    result = {"cpu": platform.processor() or platform.machine(), "decoder": "bundle clipcap", "runs": {}}
    for max_batch in (32, 1):
        proc, url = start(max_batch)
        try:
            load(url, images[:8], 2, 4, expected)  # warm-up
            rows = [load(url, images, clients, max(clients, args.requests // clients), expected)
                    for clients in (1, 4, 16)]
            rows[-1]["largest_batch"] = httpx.get(f"{url}/health").json()["largest_batch"]
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        result["runs"][f"max_batch {max_batch}"] = rows
        print(max_batch, json.dumps(rows), flush=True)
    batched, single = result["runs"]["max_batch 32"][-1], result["runs"]["max_batch 1"][-1]
    result["16 clients: throughput ratio"] = round(batched["captions_per_s"] / single["captions_per_s"], 2)
    result["16 clients: p99 ratio"] = round(batched["p99_ms"] / single["p99_ms"], 2)
    from unembed.io import write_json

    write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
