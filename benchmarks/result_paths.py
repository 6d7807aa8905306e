"""How the benchmarks record a path in a result file: never as an absolute path, which names only the
machine the run was on (tests/test_no_machine_paths.py checks the results)."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def recorded_path(path: str | os.PathLike) -> str:
    """`path` relative to the repository or the working directory where it lies inside one (the
    repository itself is "."), a relative path as given, else only its last two parts."""
    path = Path(path)
    if not path.is_absolute():
        return str(path)
    for base in (ROOT, Path.cwd()):
        try:
            return str(path.resolve().relative_to(base.resolve()))
        except ValueError:
            continue
    return str(Path(*path.parts[-2:]))
