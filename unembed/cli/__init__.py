"""The `unembed` command line. argparse lives in this package and only here; each command is a thin
call into the library, and library errors become one stderr line and an exit code:

    0  everything succeeded
    1  some inputs failed (each named on stderr); the others were processed and written
    2  nothing could be done: bad usage, a model that cannot load, mismatched embedder, bad data
    3  an internal error (a bug): one line naming it and the file holding its traceback
       (or the traceback itself with --debug); what was already written is kept
  130  interrupted (what was already written is kept)

One module per command group, each with its handlers and, next to them, `register(subparsers)`
adding its arguments: adding a command touches one module and COMMAND_GROUPS.
"""
from __future__ import annotations

import argparse
import sys

from unembed.cli import caption, data, evaluate, models, published, serve, train
from unembed.cli.help import finish_help
from unembed.cli.common import (EXIT_FAILED, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, check_device,
                                err)

COMMAND_GROUPS = (caption, evaluate, train, published, models, data, serve)
__all__ = ["EXIT_OK", "EXIT_PARTIAL", "EXIT_FAILED", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "build_parser", "main"]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; given the command about to run, the per-decoder `train` commands (which
    import every decoder module, hence torch) are added only when that command is `train`."""
    from unembed import __version__

    parser = argparse.ArgumentParser(prog="unembed", description="Turn joint (CLIP-style) embeddings back into text.",
                                     epilog="exit codes: 0 ok, 1 some inputs failed, 2 failed, 3 internal error, "
                                            "130 interrupted")
    parser.add_argument("--version", action="version", version=f"unembed {__version__}")
    parser.add_argument("--debug", action="store_true", help="on an internal error, print its traceback")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        if group is train:
            group.register(sub, decoders=command in (None, "train"))
        else:
            group.register(sub)
    return finish_help(parser)


def main(argv: list[str] | None = None) -> int:
    from unembed.errors import UnembedError, did_you_mean

    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv  # anywhere on the line, not only before the command
    argv = [a for a in argv if a != "--debug"]
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    commands = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if command is not None and command not in commands:
        err(f"unknown command {command!r}{did_you_mean(command, commands)} (unembed --help lists them)")
        return EXIT_FAILED
    args = parser.parse_args(argv)
    args.debug = debug
    try:
        check_device(args)
        return args.func(args)
    except KeyboardInterrupt:
        err("interrupted; output written so far is kept")
        return EXIT_INTERRUPTED
    except UnembedError as e:
        err(str(e))
        return EXIT_FAILED
    except Exception as e:  # a bug: one line and where its traceback is, never a bare traceback
        return _internal_error(e, args.debug)


def _internal_error(error: Exception, debug: bool) -> int:
    import tempfile
    import traceback

    text = "".join(traceback.format_exception(error))
    what = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if debug:
        sys.stderr.write(text)
        err(f"internal error: {what}")
    else:
        with tempfile.NamedTemporaryFile("w", prefix="unembed-traceback-", suffix=".txt", delete=False) as f:
            f.write(text)
        err(f"internal error: {what} (a bug; the traceback is in {f.name}, or rerun with --debug)")
    return EXIT_INTERNAL
