"""Run several `unembed` commands in one process (launched once, by `accelerate launch` or plainly):
each training of the distributed test pays the interpreter's and torch's start-up once, not per command.

    python tests/run_commands.py COMMANDS.json           # exits with the first failure's code
    python tests/run_commands.py COMMANDS.json --each    # runs every command; each process R writes
                                                         # COMMANDS.json.rankR.codes (the exit codes) and
                                                         # COMMANDS.json.I.rankR.stderr (command I's stderr)
"""
import contextlib
import json
import os
import sys

from unembed.cli import main


def run_each(listing: str) -> None:
    rank = os.environ.get("RANK", "0")
    codes = []
    for i, argv in enumerate(json.loads(open(listing).read())):
        with open(f"{listing}.{i}.rank{rank}.stderr", "w") as stderr, contextlib.redirect_stderr(stderr):
            codes.append(main(argv))
    with open(f"{listing}.rank{rank}.codes", "w") as f:
        json.dump(codes, f)


if __name__ == "__main__":
    if sys.argv[2:] == ["--each"]:
        run_each(sys.argv[1])
    else:
        for argv in json.loads(open(sys.argv[1]).read()):
            code = main(argv)
            if code:
                sys.exit(code)
