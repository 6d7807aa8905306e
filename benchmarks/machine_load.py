"""How the timing benchmarks record the machine's load: a timed run beside other jobs is slower, and
its result file says so."""
from __future__ import annotations

import os

BUSY_LOAD = 1.5


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def load_record(start: list[float], end: list[float], interleaved: bool = True) -> dict:
    """interleaved: the compared sides took turns call by call, so a busy machine slowed both alike."""
    record = {"load_average_start": start, "load_average_end": end}
    if max(start[0], end[0]) > BUSY_LOAD:
        record["load_note"] = (f"1-minute load average above {BUSY_LOAD} on this {os.cpu_count()}-core machine "
                               f"(start {start[0]}, end {end[0]}): other jobs ran beside this one"
                               + (" and slowed the timed calls; the sides took turns call by call, so ratios are "
                                  "fairer than rates" if interleaved else ""))
    return record
