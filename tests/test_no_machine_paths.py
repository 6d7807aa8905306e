"""Nothing shipped names this machine: no tracked text file under unembed/ (model cards and bundle configs
included), docs/, scripts/, benchmarks/ (recorded results included) or the README names an absolute path
of the machine it was made on (/work/..., /tmp/..., /home/..., /Users/..., C:\\...). Such a path means
nothing on another machine, and a bundle config naming one works only where it was built."""
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ["unembed", "docs", "scripts", "benchmarks", "README.md"]

# Roots under which only a particular machine's files live. System paths that are the same everywhere
# (/dev/null, /usr/bin/env, /etc/..., /proc/self/...) and URL paths or API routes (/caption, /health) are
# not matched: only these roots count, and only where the slash starts the path (not inside a URL or a
# longer path like a/tmp/b).
MACHINE_ROOTS = ["work", "tmp", "var/tmp", "var/folders", "private", "root", "home", "Users", "mnt", "media",
                 "opt", "srv", "scratch", "data", "workspace", "workspaces", "content", "kaggle", "gpfs",
                 "lustre", "nfs", "cluster", "shared", "storage"]
POSIX = re.compile(r"(?<![\w.~$\-/:\\])/(?:%s)/[\w.~$\-]" % "|".join(re.escape(r) for r in MACHINE_ROOTS))
WINDOWS = re.compile(r"(?<![\w])[A-Za-z]:(?:\\\\?|/)(?:Users|Documents and Settings|home|work|tmp|temp)\b",
                     re.IGNORECASE)


def machine_paths(text: str) -> list[tuple[int, str]]:
    """(line number, line) for each line of text that names a machine's absolute path."""
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)
            if POSIX.search(line) or WINDOWS.search(line)]


def shipped_text_files() -> list[str]:
    """The files git tracks there, and the new ones it would add (untracked, not ignored)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *SHIPPED],
                         cwd=REPO, capture_output=True, check=True)
    return sorted(set(p for p in out.stdout.decode().split("\0") if p))


def test_pattern():
    for leak in ['"lm": "/work/bundle-run/compare/models/iterative-lm"', "--work /tmp/entity-run",
                 "default=\"/tmp/serve-bench\"", "see /home/ann/x", "/Users/bob/unembed", "/root/.cache/x",
                 "IMAGES=/mnt/coco", "`/opt/data/x`", r"C:\Users\bob\unembed", "C:/Users/bob", "'/var/tmp/x'"]:
        assert machine_paths(leak), leak
    for fine in ["https://example.com/work/tmp/x", "POST /caption/embeddings", "GET /health", "> /dev/null",
                 "#!/usr/bin/env bash", "/etc/hosts", "/proc/self/status", "f\"/proc/{pid}/status\"",
                 "benchmarks/tmp/x", "bundle-run/compare/models", "~/work/x", "$HOME/tmp/x", "a/work/b",
                 "file://localhost/x", "…/snapshots/HASH", "the /tmp folder", "e.g. http://host:8000/work/x"]:
        assert not machine_paths(fine), fine


def test_no_machine_paths():
    files = shipped_text_files()
    assert "README.md" in files and any(p.startswith("unembed/") for p in files)
    found = []
    for path in files:
        data = (REPO / path).read_bytes() if (REPO / path).is_file() else b""
        if b"\0" in data[:8192]:
            continue  # binary: weights, images
        for n, line in machine_paths(data.decode("utf-8", errors="replace")):
            found.append(f"{path}:{n}: {line[:200]}")
    if found:
        pytest.fail("absolute paths of a machine in shipped files:\n" + "\n".join(found), pytrace=False)
