"""`unembed serve` under concurrent clients: captions/s and p50 / p99 latency at 1, 4 and 16 clients,
dynamic batching (`--max-batch 32`, the default `--max-wait-ms 0`: an idle server starts at once,
batches form behind the one being decoded) against `--max-batch 1`, in one run, with the bundle's
default decoder (clipcap) on scenes images, one image per request. Every answer is checked: a 200
whose one record names its file and carries what `unembed caption` prints for that image.

The servers run side by side (an idle one costs nothing) and each row is measured in turns,
A-B-C-C-B-A repeated (`--rounds`), so that a change in the machine's load over the run falls on all
alike. C, the control, is a second `--max-batch 1` server: its throughput ratio to the first, which
should be 1, shows how far the other jobs on the machine move the figures. The load average (os.getloadavg) is recorded at the start and the end of each row and
of the run; other jobs share these cores, and the JSON says so when it passed 1.5. Each row also
has the CPU time per caption of the server process and of the clients (this process): less
sensitive to other jobs than captions/s, though threads that spin while waiting for a core count.

    python benchmarks/serve_speed.py --out benchmarks/results/serve_speed_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

CONFIGS = {"batching": ["--max-batch", "32"], "max_batch 1": ["--max-batch", "1"],
           "control": ["--max-batch", "1"]}  # a second, identical max_batch 1 server: its ratio to the first is noise
ORDER = ["batching", "max_batch 1", "control", "control", "max_batch 1", "batching"]
BUSY = 1.5  # a load average above this on 2 cores: other jobs ran alongside


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(options: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "unembed.cli", "serve", "--decoder", "clipcap", "--port", str(port),
                             "--device", "cpu", *options], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("the server did not start")


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), 0 where there is no /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_clients(url: str, images: list[Path], clients: int, per_client: int, expected: dict,
                offset: int = 0) -> tuple[list[float], float]:
    """Latencies of clients x per_client requests (each answer checked) and the wall time."""
    def client(c: int) -> list[float]:
        latencies = []
        with httpx.Client(timeout=300) as http:
            for r in range(per_client):
                path = images[(offset + c * per_client + r) % len(images)]
                t0 = time.perf_counter()
                response = http.post(f"{url}/caption", files={"file": (path.name, path.read_bytes(), "image/png")})
                latencies.append(time.perf_counter() - t0)
                if response.status_code != 200:
                    raise AssertionError(f"{path.name}: {response.status_code} {response.text[:200]}")
                (record,) = response.json()
                if record["file"] != path.name or record["caption"] != expected[path.name]:
                    raise AssertionError(f"{path.name}: got {record}, `unembed caption` says {expected[path.name]!r}")
        return latencies

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [x for part in pool.map(client, range(clients)) for x in part]
    return latencies, time.perf_counter() - t0


def summary(clients: int, latencies: list[float], seconds: float) -> dict:
    latencies = sorted(latencies)
    return {"clients": clients, "requests": len(latencies), "checked": len(latencies),
            "captions_per_s": round(len(latencies) / seconds, 1),
            "p50_ms": round(1000 * statistics.median(latencies), 1),
            "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/serve_speed_cpu.json")
    parser.add_argument("--work", default="bench-run/serve")
    parser.add_argument("--requests", type=int, default=400, help="requests per client count and server (at least)")
    parser.add_argument("--rounds", type=int, default=2, help="A-B-B-A rounds per row")
    args = parser.parse_args()
    from unembed.data.scenes import write_scenes

    load_at_start = load_average()
    work = Path(args.work)
    if not (work / "scenes" / "test" / "captions.json").is_file():
        write_scenes(work / "scenes", n=8, n_eval=64, seed=5)
    images = sorted((work / "scenes" / "test" / "images").glob("*.png"))
    out = work / "cli.jsonl"
    subprocess.run([sys.executable, "-m", "unembed.cli", "caption", *map(str, images), "--decoder", "clipcap", "--out",
                    str(out), "--device", "cpu"], check=True, capture_output=True)
    expected = {Path(r["file"]).name: r["caption"] for r in map(json.loads, out.read_text().splitlines())}
    result = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "decoder": "bundle clipcap",
              "configs": {name: " ".join(options) for name, options in CONFIGS.items()},
              "order": f"per row, {args.rounds} x ({', '.join(ORDER)}), the requests split evenly over the turns",
              "runs": {name: [] for name in CONFIGS}}
    servers = {name: start(options) for name, options in CONFIGS.items()}
    try:
        for _, url in servers.values():
            run_clients(url, images[:8], 2, 4, expected)  # warm-up
        for clients in (1, 4, 16):
            per_client = -(-args.requests // (clients * 2 * args.rounds))  # per client and turn, rounded up
            measured = {name: ([], 0.0) for name in CONFIGS}
            cpu = {name: [0.0, 0.0] for name in CONFIGS}  # the server's, the clients' (this process's) CPU seconds
            load_before = load_average()
            for turn, name in enumerate(ORDER * args.rounds):
                server_cpu, client_cpu = cpu_seconds(servers[name][0].pid), time.process_time()
                latencies, seconds = run_clients(servers[name][1], images, clients, per_client, expected,
                                                 offset=turn * clients * per_client)
                measured[name] = (measured[name][0] + latencies, measured[name][1] + seconds)
                cpu[name][0] += cpu_seconds(servers[name][0].pid) - server_cpu
                cpu[name][1] += time.process_time() - client_cpu
            load_after = load_average()
            for name in CONFIGS:
                row = {**summary(clients, *measured[name]), "load_average": [load_before, load_after]}
                requests = row["requests"]
                row["cpu_ms_per_caption"] = {"server": round(1000 * cpu[name][0] / requests, 1),
                                             "clients": round(1000 * cpu[name][1] / requests, 1)}
                result["runs"][name].append(row)
                print(name, json.dumps(row), flush=True)
        for name, (_, url) in servers.items():
            health = httpx.get(f"{url}/health").json()
            result["runs"][name][-1]["largest_batch"] = health["largest_batch"]
            result["runs"][name][-1]["refused_requests"] = health["refused_requests"]
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=60)
    for i, clients in enumerate((1, 4, 16)):
        batched, single, control = (result["runs"][name][i] for name in CONFIGS)
        result[f"{clients} clients: throughput ratio"] = round(batched["captions_per_s"] / single["captions_per_s"], 2)
        result[f"{clients} clients: p99 ratio"] = round(batched["p99_ms"] / single["p99_ms"], 2)
        result[f"{clients} clients: control throughput ratio"] = round(control["captions_per_s"]
                                                                       / single["captions_per_s"], 2)
        result[f"{clients} clients: CPU per caption ratio"] = round(sum(single["cpu_ms_per_caption"].values())
                                                                    / sum(batched["cpu_ms_per_caption"].values()), 2)
    result["goals"] = {"1 client: throughput ratio >= 0.95": result["1 clients: throughput ratio"] >= 0.95,
                       "16 clients: throughput ratio >= 4": result["16 clients: throughput ratio"] >= 4}
    result["load_average"] = {"start": load_at_start, "end": load_average()}
    loads = [load_at_start, result["load_average"]["end"]] + [x for rows in result["runs"].values()
                                                               for row in rows for x in row["load_average"]]
    if max(loads) > BUSY:
        result["note"] = (f"the load average reached {max(loads)} on {os.cpu_count()} cores: other jobs shared the "
                          "machine during this run, so absolute figures are low and noisy; the turns keep the "
                          "ratios fairer than the absolute numbers, and the control ratio (1 on a quiet machine) "
                          "shows how noisy they still are")
    from unembed.io import write_json

    write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
