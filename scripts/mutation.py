#!/usr/bin/env python3
"""Mutation testing (mutmut 3.8.1) of the modules whose logic breaks most silently, on the fast tests
that cover them; writes benchmarks/results/mutation.json. Run by `make mutation` (minutes; not CI).

  python scripts/mutation.py [--modules memory,bridges] [--max-children 2] [--baseline] [--keep] [--out PATH]

mutmut copies unembed/ and tests/ into mutants/, rewrites every function of the five modules
(pyproject.toml [tool.mutmut] only_mutate) into a trampoline over its mutants, runs the selected tests
(pyproject.toml [tool.mutmut] pytest_add_cli_args_test_selection: the fast tests that reach these
modules, never the minutes-long training fixtures) once to learn which tests reach which function,
then, for each mutant, runs only the tests that reach its function, cheapest first, stopping at the
first failure. Its fork server preloads the heavy imports (see PRELOAD_MODULE), so each mutant costs a
fork and its tests, not seconds of imports. --baseline deselects tests/test_mutation_*.py (the tests
written against the survivors) and records the result under "baseline".

Steps: (1) mutant generation and the stats run, shared by all modules; (2) `mutmut run 'MODULE.*'`
per module, timed; (3) per module: mutants total / killed / survived / timeout / suspicious /
skipped / no tests, the share killed, the tests that reached it, and every survivor with its diff and,
where it has been judged equivalent or harmless, the reason (HARMLESS below). A survivor without a
reason is a gap in the tests.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import tomllib
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MUTMUT_VERSION = "3.8.1"
MODULES = {  # cheapest first
    "memory": "unembed/memory.py",
    "bridges": "unembed/decoders/bridges.py",
    "tokenizers": "unembed/tokenizers.py",
    "prefix": "unembed/decoders/prefix.py",
    "metrics": "unembed/eval/metrics.py",
}
TARGET = 0.85
# Written into mutants/ (mutmut's copy of the tree, first on sys.path there) at every run:
# - mutation_preload.py, imported once by mutmut's fork server, whose forks test the mutants: it imports
#   tests/conftest.py first, which isolates HOME and every cache variable exactly as it does for pytest
#   (and asserts that no hub library came before it), then torch, open_clip, transformers and the unembed
#   modules, so a mutant's test process starts with them instead of spending seconds importing them.
#   Each test session then reuses that conftest module (pytest finds it in sys.modules) ...
# - mutation_plugin.py (pytest -p mutation_plugin, pyproject [tool.mutmut]): ... and gets its own fresh
#   isolated folders from conftest's own _isolate_environment (the session's end deletes them, as always).
#   It runs each mutant's tests cheapest first (those that need no shared fixture, then by the stats
#   run's durations), so a mutant that a fast test kills never waits for the tiny embedder's training;
#   with UNEMBED_MUTATION_BASELINE=1 it deselects tests/test_mutation_*.py (the suite before them).
PRELOAD_MODULE = """\
import tests.conftest as conftest  # first: it points HOME and the hub caches into a fresh temporary folder

conftest._mutation_preloaded = True
from unembed.compat import import_open_clip, import_transformers  # noqa: E402

import_open_clip()
transformers = import_transformers()
transformers.AutoTokenizer, transformers.GPT2LMHeadModel, transformers.PreTrainedTokenizerFast  # lazy modules
import numpy, peft, PIL.Image, pytest, safetensors.torch, sympy, tokenizers, torch, torch._dynamo  # noqa: E401,E402,F401
import unembed.decoders.bridges, unembed.decoders.prefix, unembed.embedders, unembed.eval.metrics  # noqa: E401,E402,F401
import unembed.lm, unembed.memory, unembed.tokenizers, unembed.training.prefix  # noqa: E401,E402,F401
from importlib.metadata import entry_points  # noqa: E402

for plugin in entry_points(group="pytest11"):  # the installed pytest plugins, imported by every session
    plugin.load()
import gc  # noqa: E402

gc.freeze()  # what is loaded now lives as long as the process: pytest's gc.collect() at each session's end skips it
"""
PLUGIN_MODULE = """\
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

HUB_LIBRARIES = ("huggingface_hub", "open_clip", "transformers", "datasets", "evaluate")


def pytest_configure(config):
    conftest = sys.modules.get("tests.conftest")
    if conftest is None or not getattr(conftest, "_mutation_preloaded", False):
        return  # conftest.py is imported by this session, as usual
    # Preloaded by mutmut's fork server: give this session fresh folders of its own, through conftest's
    # own isolation (its check that no hub library came first held when the fork server imported it).
    imported = {name: sys.modules.pop(name) for name in HUB_LIBRARIES if name in sys.modules}
    try:
        conftest._ISOLATED = Path(tempfile.mkdtemp(prefix="unembed-tests-"))
        conftest._isolate_environment(conftest._ISOLATED)
    finally:
        sys.modules.update(imported)


def _needs_shared_fixture(item) -> bool:
    for name in item.fixturenames:
        defs = item._fixtureinfo.name2fixturedefs.get(name) or ()
        if any(d.scope != "function" and d.baseid and not name.startswith("_") for d in defs):
            return True
    return False


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    if os.environ.get("UNEMBED_MUTATION_BASELINE") == "1":
        new = [i for i in items if Path(i.nodeid.split("::")[0]).name.startswith("test_mutation_")]
        if new:
            config.hook.pytest_deselected(items=new)
            items[:] = [i for i in items if i not in new]
    try:
        durations = json.loads(Path("mutmut-stats.json").read_text(encoding="utf-8"))["duration_by_test"]
    except (OSError, ValueError, KeyError):
        durations = {}
    items.sort(key=lambda i: (_needs_shared_fixture(i), durations.get(i.nodeid, 0.0)))
"""
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

# Survivors judged equivalent (no input can tell them from the original) or harmless (only an error
# message's wording, or a default every caller overrides). Keyed by module, then by the function and
# the mutated line(s) as `describe` prints them, so a reason never sticks to a different mutant after
# the source moves.
HARMLESS: dict[str, dict[str, str]] = {
    "memory": {},
    "bridges": {},
    "tokenizers": {},
    "prefix": {},
    "metrics": {},
}


def mutmut_config() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["mutmut"]


def check_preload() -> None:
    """The preload imports (conftest's own check included), once here before mutmut's fork server does."""
    subprocess.run([sys.executable, "-c", PRELOAD_MODULE], cwd=REPO, check=True, env={**os.environ, **ENV},
                   stdout=subprocess.DEVNULL)


def not_mutated(path: str) -> list[str]:
    """Functions mutmut 3 leaves alone: it mutates no decorated function but a static- or classmethod."""
    import ast

    out = []
    for node in ast.parse((REPO / path).read_text(encoding="utf-8")).body:
        scope = [(node, "")] if not isinstance(node, ast.ClassDef) else [(n, node.name + ".") for n in node.body]
        for fn, prefix in scope:
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or not fn.decorator_list:
                continue
            names = [ast.unparse(d) for d in fn.decorator_list]
            if names not in (["staticmethod"], ["classmethod"]):
                out.append(f"{prefix}{fn.name} (@{', @'.join(names)})")
    return out


def mutmut_bin() -> Path:
    return Path(sys.executable).parent / "mutmut"


SETUP = """
import sys
from mutmut.__main__ import (CatchOutput, collect_or_load_stats, copy_also_copy_files, copy_src_dir,
                             create_mutants, get_mutant_runner, makedirs, set_mutant_under_test,
                             setup_source_paths, store_lines_covered_by_tests)
from pathlib import Path
n = int(sys.argv[1])
set_mutant_under_test("mutant_generation")
makedirs(Path("mutants"), exist_ok=True)
copy_src_dir(); copy_also_copy_files(); setup_source_paths(); store_lines_covered_by_tests()
stats = create_mutants(n)
print(f"mutants generated: {stats.mutated} files mutated, {stats.ignored} copied", flush=True)
collect_or_load_stats(get_mutant_runner(n), apply_config_invalidation=True)
print("stats collected", flush=True)
"""


def run_logged(cmd: list[str], log: Path) -> tuple[int, float]:
    start = time.monotonic()
    with open(log, "w", encoding="utf-8") as out:
        code = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **ENV}).returncode
    wall = time.monotonic() - start
    tail = log.read_text(encoding="utf-8", errors="replace").replace("\r", "\n").strip().splitlines()[-3:]
    print(f"  exit {code} in {wall:.0f}s: " + " / ".join(line.strip() for line in tail), flush=True)
    return code, wall


def dotted(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def function_of(key: str) -> str:
    """`Class.method` or `function` of a mutant's key (unembed.memory.xǁTextMemoryǁfill__mutmut_8)."""
    name = key.rpartition(".")[2].rpartition("__mutmut_")[0]
    return name[2:] if name.startswith("x_") else ".".join(name.split("ǁ")[1:])


def describe(key: str, diff: str) -> str:
    """`function: -removed | +added`, the mutated lines without the diff's context."""
    changed = [line[0] + " ".join(line[1:].split()) for line in diff.splitlines()[2:]
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    return f"{function_of(key)}: " + " | ".join(changed)


def collect(name: str, path: str, stats: dict, status_by_exit_code) -> dict:
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.utils.format_utils import get_module_from_key

    meta = json.loads((REPO / "mutants" / (path + ".meta")).read_text(encoding="utf-8"))
    statuses = {key: status_by_exit_code[code] for key, code in meta["exit_code_by_key"].items()}
    counts = Counter(statuses.values())
    total = len(statuses)
    killed = counts["killed"]
    reasons = HARMLESS.get(name, {})
    survivors, used_reasons = [], set()
    for key, status in sorted(statuses.items()):
        if status in ("killed", "timeout", "caught by type check"):
            continue
        diff = get_diff_for_mutant(key, path=path)
        what = describe(key, diff)
        reason = reasons.get(what)
        if reason:
            used_reasons.add(what)
        survivors.append({"mutant": key, "status": status, "change": what, "reason": reason, "diff": diff})
    tests = sorted({t for fn, ts in stats["tests_by_mangled_function_name"].items()
                    if get_module_from_key(fn) == dotted(path) for t in ts})
    explained = [s for s in survivors if s["reason"]]
    share = killed / total if total else 0.0
    return {
        "path": path,
        "mutants": total,
        "killed": killed,
        "survived": counts["survived"],
        "timeout": counts["timeout"],
        "suspicious": counts["suspicious"] + counts["segfault"],
        "skipped": counts["skipped"],
        "no_tests": counts["no tests"],
        "not_checked": counts["not checked"],
        "share_killed": round(share, 4),
        "share_killed_or_timeout": round((killed + counts["timeout"]) / total, 4) if total else 0.0,
        "survivors_explained": len(explained),
        "survivors_unexplained": len(survivors) - len(explained),
        "done": share >= TARGET or len(explained) == len(survivors),
        "tests": {"count": len(tests), "files": dict(sorted(Counter(t.split("::")[0] for t in tests).items())),
                  "ids": tests},
        "survivors": survivors,
        "stale_reasons": sorted(set(reasons) - used_reasons),
    }


def summary(module: dict) -> dict:
    keys = ("mutants", "killed", "survived", "timeout", "suspicious", "skipped", "no_tests", "share_killed", "wall_s")
    return {**{k: module[k] for k in keys}, "tests": module["tests"]["count"],
            "survivors": [s["mutant"] for s in module["survivors"]]}


RUN_KEYS = ("tool", "command", "commands", "test_selection", "max_children", "nice", "setup_wall_s", "started",
            "machine")


def report_only(previous: dict, names: list[str]) -> tuple[dict, dict]:
    old = previous.get("modules", {})
    results = {n: {"wall_s": old.get(n, {}).get("wall_s"), "command": old.get(n, {}).get("command")} for n in names}
    return results, {k: previous[k] for k in RUN_KEYS if k in previous}


def run_mutmut(args, names: list[str], config: dict) -> tuple[dict, dict, int]:
    import mutmut

    os.nice(args.nice)
    check_preload()
    if not args.keep:
        shutil.rmtree(REPO / "mutants", ignore_errors=True)
    (REPO / "mutants").mkdir(exist_ok=True)
    (REPO / "mutants" / "mutation_preload.py").write_text(PRELOAD_MODULE, encoding="utf-8")
    (REPO / "mutants" / "mutation_plugin.py").write_text(PLUGIN_MODULE, encoding="utf-8")
    (REPO / config["preload_modules_file"]).write_text("mutation_preload\n", encoding="utf-8")
    (REPO / "mutants" / "tmp").mkdir(exist_ok=True)
    os.environ["TMPDIR"] = str(REPO / "mutants" / "tmp")  # every temporary folder of the run goes with mutants/
    os.environ["UNEMBED_MUTATION_BASELINE"] = "1" if args.baseline else "0"

    started = datetime.now(timezone.utc)
    label = " (baseline: without tests/test_mutation_*.py)" if args.baseline else ""
    print(f"mutation testing {', '.join(names)}{label} with mutmut {mutmut.__version__}, {args.max_children} at once",
          flush=True)
    print("setup: mutant generation and the stats run over the selected tests", flush=True)
    setup_cmd = [sys.executable, "-c", SETUP, str(args.max_children)]
    code, setup_wall = run_logged(setup_cmd, REPO / "mutants" / "mutmut-setup.log")
    if code:
        print("setup failed: see mutants/mutmut-setup.log", file=sys.stderr)
        return {}, {}, code
    results = {}
    commands = ["make mutation  # = python scripts/mutation.py: mutmut's mutant generation and stats run, then"]
    for name in names:
        cmd = [str(mutmut_bin()), "run", "--max-children", str(args.max_children), dotted(MODULES[name]) + ".*"]
        commands.append(" ".join(["mutmut"] + cmd[1:-1] + [f"'{cmd[-1]}'"]))
        print(f"{name}: {commands[-1]}", flush=True)
        code, wall = run_logged(cmd, REPO / "mutants" / f"mutmut-{name}.log")
        if code:
            print(f"mutmut failed on {name}: see mutants/mutmut-{name}.log", file=sys.stderr)
            return {}, {}, code
        results[name] = {"wall_s": round(wall, 1), "command": commands[-1]}
    run = {
        "tool": f"mutmut {mutmut.__version__}",
        "command": "make mutation" + (" (python scripts/mutation.py --baseline)" if args.baseline else ""),
        "commands": commands,
        "test_selection": config["pytest_add_cli_args_test_selection"]
        + (["(tests/test_mutation_*.py deselected)"] if args.baseline else []),
        "max_children": args.max_children,
        "nice": args.nice,
        "setup_wall_s": round(setup_wall, 1),
        "started": started.isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    return results, run, 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modules", default=",".join(MODULES), help="comma-separated subset of " + ",".join(MODULES))
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2, help="mutants tested at once")
    parser.add_argument("--keep", action="store_true", help="reuse mutants/ (default: start afresh)")
    parser.add_argument("--baseline", action="store_true",
                        help="without tests/test_mutation_*.py (the suite before them); recorded under \"baseline\"")
    parser.add_argument("--nice", type=int, default=10, help="niceness of the run: it yields the shared cores")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: rewrite the report from mutants/ (after editing HARMLESS, say)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "mutation.json")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.modules.split(",") if n.strip()]
    unknown = sorted(set(names) - set(MODULES))
    if unknown:
        parser.error(f"unknown modules {unknown} (known: {', '.join(MODULES)})")
    out = args.out.resolve()

    import mutmut
    from mutmut.stats import status_by_exit_code

    if mutmut.__version__ != MUTMUT_VERSION:
        print(f"warning: mutmut {mutmut.__version__}, this script was written for {MUTMUT_VERSION}", file=sys.stderr)
    os.chdir(REPO)  # mutmut reads pyproject.toml and writes mutants/ in the working directory
    config = mutmut_config()
    previous = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {}
    if args.report_only:
        if args.baseline or not (REPO / "mutants" / "mutmut-stats.json").is_file():
            parser.error("--report-only rewrites the last run's report from mutants/ (not a baseline)")
        results, run = report_only(previous, names)
    else:
        results, run, code = run_mutmut(args, names, config)
        if code:
            return code
    stats = json.loads((REPO / "mutants" / "mutmut-stats.json").read_text(encoding="utf-8"))
    for name in names:
        results[name] = {**collect(name, MODULES[name], stats, status_by_exit_code), **results[name],
                         "not_mutated": not_mutated(MODULES[name])}

    if args.baseline:
        base = previous.get("baseline", {})
        modules = {**base.get("modules", {}), **{n: summary(r) for n, r in results.items()}}
        report = {**previous, "baseline": {**run, "modules": {n: modules[n] for n in MODULES if n in modules}}}
        shown = results
    else:
        partial = set(names) != set(MODULES)
        modules = {**previous.get("modules", {}), **results} if partial else results
        report = {
            "target": f"at least {TARGET:.0%} of each module's mutants killed, or every survivor named with a reason",
            "share_killed": "killed / mutants (a timeout, a no-tests or a survived mutant is not killed)",
            **run,
            "modules": {n: modules[n] for n in MODULES if n in modules},
            "baseline": previous.get("baseline"),
        }
        shown = report["modules"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    print(f"\n{'module':<11} {'mutants':>7} {'killed':>6} {'surv':>5} {'t/o':>4} {'none':>5} {'share':>6}  wall")
    for name, r in shown.items():
        print(f"{name:<11} {r['mutants']:>7} {r['killed']:>6} {r['survived']:>5} {r['timeout']:>4} {r['no_tests']:>5} "
              f"{r['share_killed']:>6.1%}  {r['wall_s'] or 0:.0f}s  {'done' if r['done'] else 'NOT DONE'}")
        for s in r["survivors"]:
            if not s["reason"]:
                print(f"    {s['status']:<9} {s['mutant']}\n              {s['change']}")
    print(f"wrote {out}")
    return 0 if all(r["done"] for r in shown.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
