"""DeCap's projection onto a CC3M-size text memory: M = 1,000,000 vectors of D = 512, queried by 1,000
image embeddings. Time and peak memory of the chunked projection (unembed/memory.py: O(chunk x M)
weights at once) against the whole N x M matrix, each in a fresh process. Every projected vector is
checked: the two agree on every element to within 1e-4 (max |difference| recorded). Not asserted bit
for bit: a chunk of queries and the whole matrix are products of other shapes, whose sums may run in
other orders. The 1-minute load average is recorded at the start and the end, with a note above 1.5.

    python benchmarks/decap_projection.py --out benchmarks/results/decap_projection_cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine_load import load_average, load_record


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak_rss_kb() -> int:
    """Reset the process's peak RSS to its current RSS (Linux: clear_refs 5) and return it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_kb("VmRSS")


def run(variant: str, m: int, d: int, n: int, out: str, device: str = "cpu") -> dict:
    """One projection in this process; writes the projected vectors to `out`."""
    from unembed.memory import PROJECTION_BUDGET, TextMemory

    torch.manual_seed(0)
    memory = TextMemory(0, d)
    memory.vectors = torch.nn.functional.normalize(torch.randn(m, d), dim=-1).to(device)
    queries = torch.randn(n, d).to(device)
    budget = PROJECTION_BUDGET if variant == "chunked" else n * m
    if device != "cpu":  # a GPU's first product starts its libraries (cuBLAS): not the projection's time
        memory.project(queries[:2], 0.01, budget=budget)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = _reset_peak_rss_kb()  # the set-up's temporaries must not stand in for the projection's peak
    device_base = torch.cuda.memory_allocated() // 1024 if device != "cpu" else 0
    t0 = time.perf_counter()
    result = memory.project(queries, 0.01, budget=budget)
    if device != "cpu":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    if device != "cpu":  # device memory, not the host's (the memory's vectors are in the base)
        base, peak = device_base, torch.cuda.max_memory_allocated() // 1024
    torch.save(result, out)
    return {"variant": variant, "seconds": round(seconds, 2), "queries_per_s": round(n / seconds, 1),
            "peak_rss_mb": round(peak / 1024), "extra_rss_mb_during_projection": round((peak - base) / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/decap_projection_cpu.json")
    parser.add_argument("--m", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run(args.variant, args.m, args.d, args.n, args.result, args.device)))
        return
    from unembed.memory import PROJECTION_BUDGET

    load_start = load_average()
    rows, outputs = [], {}
    with tempfile.TemporaryDirectory(prefix="decap_projection-") as scratch:
        for variant in ("chunked", "whole matrix"):
            outputs[variant] = str(Path(scratch) / f"{variant.replace(' ', '_')}.pt")
            done = subprocess.run([sys.executable, __file__, "--variant", variant, "--result", outputs[variant],
                                   "--m", str(args.m), "--d", str(args.d), "--n", str(args.n), "--device",
                                   args.device], capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
        a, b = (torch.load(outputs[v], weights_only=True, map_location="cpu") for v in ("chunked", "whole matrix"))
    assert a.shape == b.shape == (args.n, args.d), f"projected shapes {tuple(a.shape)} and {tuple(b.shape)}"
    difference = float((a - b).abs().max())
    assert difference < 1e-4, f"chunked and whole projections differ by {difference}"
    result = {"device": args.device, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "memory_vectors": args.m, "dim": args.d, "queries": args.n,
              "chunk_queries": max(1, PROJECTION_BUDGET // args.m), "max_abs_difference": difference,
              "checked": f"all {args.n} projected vectors, every element within 1e-4 of the whole matrix's"
                         + (" (here bit for bit equal)" if difference == 0 else " (not bit for bit: the products have "
                            "other shapes, so their sums may run in other orders)"),
              **load_record(load_start, load_average(), interleaved=False),
              "memory_vectors_mb": round(args.m * args.d * 4 / 2 ** 20), "runs": rows,
              "time_ratio_whole_over_chunked": round(rows[1]["seconds"] / rows[0]["seconds"], 2),
              "extra_memory_ratio_whole_over_chunked": round(rows[1]["extra_rss_mb_during_projection"]
                                                             / max(1, rows[0]["extra_rss_mb_during_projection"]), 1)}
    from unembed.io import write_json

    write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
