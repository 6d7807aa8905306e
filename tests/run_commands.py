"""Run several `unembed` commands in one process (launched once, by `accelerate launch` or plainly):
each training of the distributed test pays the interpreter's and torch's start-up once, not per command.

    python tests/run_commands.py COMMANDS.json   # a JSON list of argument lists; exits with the first failure's code
"""
import json
import sys

from unembed.cli import main

if __name__ == "__main__":
    for argv in json.loads(open(sys.argv[1]).read()):
        code = main(argv)
        if code:
            sys.exit(code)
