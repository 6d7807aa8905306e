"""What every command shares: exit codes, the two stderr helpers, option parsing helpers, and the
options generated from a decoder config's fields."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

EXIT_OK, EXIT_PARTIAL, EXIT_FAILED, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def err(message: str) -> None:
    print(f"unembed: {message}", file=sys.stderr, flush=True)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class ErrorCounter:
    """The `on_error` of a run over many inputs: names each bad one on stderr and counts them."""

    def __init__(self):
        self.count = 0

    def __call__(self, error) -> None:
        self.count += 1
        err(f"skipped {error}")


def check_device(args) -> None:
    """A command's --device, checked before any work (embedders.resolve_device): a device this
    machine lacks is one line and exit 2, never an internal error from deep inside torch."""
    device = getattr(args, "device", None)
    if device and device != "auto":
        from unembed.embedders import resolve_device

        resolve_device(device)


def exit_code(done: int, failed: int) -> int:
    if done == 0:
        return EXIT_FAILED
    return EXIT_PARTIAL if failed else EXIT_OK


def json_arg(value: str) -> dict:
    """A JSON object given inline or as a file path."""
    from unembed.errors import BadInputError
    from unembed.io import read_json

    if Path(value).is_file():
        parsed = read_json(value)
    else:
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as e:
            raise BadInputError(value, f"is neither a JSON object nor a JSON file ({e.msg})") from None
    if not isinstance(parsed, dict):
        raise BadInputError(value, "must be a JSON object")
    return parsed


def given(args, names) -> dict:
    """The options among `names` that were given on the command line."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def arch_arg(value: str | None, make_config):
    """An architecture config from --arch JSON, or None for the method's default."""
    from unembed.errors import BadInputError

    if not value:
        return None
    try:
        return make_config(**json_arg(value))
    except TypeError as e:
        raise BadInputError("--arch", str(e)) from None


# --- options generated from a config dataclass ----------------------------------------------------

def _field_metadata(config_class, name: str) -> dict:
    """A field's help and choices, from the first class in the MRO that declares them (a subclass
    that only changes a default keeps its parent's help)."""
    for klass in config_class.__mro__:
        found = getattr(klass, "__dataclass_fields__", {}).get(name)
        if found is not None and found.metadata:
            return dict(found.metadata)
    return {}


def option_flag(config_class, name: str) -> str:
    """The command-line spelling of a config field: --name-with-dashes, or the flag its metadata names."""
    return "--" + _field_metadata(config_class, name).get("flag", name).replace("_", "-")


def add_config_options(parser, config_class, names, hidden: bool = False) -> None:
    """--option-name for each config field in `names`: typed by the field, help and choices from its
    metadata (which may also name the flag); a dict field takes JSON (inline or a file), a bool field
    is a switch (--name), and one that defaults to on also has --no-name. `hidden` ones are parsed
    but not listed in --help (another kind's options, parsed only to be refused by name)."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    for name in names:
        f, meta = fields[name], _field_metadata(config_class, name)
        flag, kind = option_flag(config_class, name), _type_name(f)
        help = argparse.SUPPRESS if hidden else meta.get("help")
        if kind == "bool":
            action = argparse.BooleanOptionalAction if f.default is True else "store_true"
            parser.add_argument(flag, dest=name, action=action, default=None, help=help)
        else:
            convert = {"int": int, "float": float}.get(kind, str)  # JSON is parsed by config_options
            parser.add_argument(flag, dest=name, type=convert, choices=meta.get("choices"), help=help)


def _type_name(f) -> str:
    """A field's type as written: a string under `from __future__ import annotations`, else a class."""
    return getattr(f.type, "__name__", str(f.type))


def config_options(args, config_class, names) -> dict:
    """The config fields among `names` given on the command line, JSON ones parsed."""
    options = given(args, names)
    for f in dataclasses.fields(config_class):
        if f.name in options and _type_name(f) == "dict":
            options[f.name] = json_arg(options[f.name])
    return options


def add_train_flags(p, resume: bool = True) -> None:
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--max-steps", type=int, help="stop after this many steps (overrides --epochs)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    p.add_argument("--validate-every", type=int, help="steps between validations (default: only at the end)")
    p.add_argument("--keep-best", action="store_true", default=None,
                   help="keep the weights of the best validation (--validate-every N) instead of the last step's")
    p.add_argument("--ema", type=float, metavar="DECAY",
                   help="keep a moving average of the weights (a decay such as 0.999) and validate, keep and save it "
                        "instead of the last step's weights")
    if resume:
        p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")


def train_config(args, defaults: dict):
    from unembed.training.loop import TrainConfig

    return TrainConfig(**{**defaults, **given(args, ("epochs", "batch_size", "lr", "seed", "device", "max_steps",
                                                       "mixed_precision", "warmup_steps", "checkpoint_every",
                                                       "validate_every", "workers", "keep_best", "ema"))})


def add_out_option(p, help: str | None = None) -> None:
    """--out of a command that writes a model directory, and --overwrite (see check_out)."""
    p.add_argument("--out", required=True, help=help)
    p.add_argument("--overwrite", action="store_true", help="replace the model already in OUT (else OUT must be "
                   "new or empty)")


def check_out(args, what: str = "decoder") -> None:
    """OUT is new, empty, or the `what` ("decoder" | "embedder") it replaces with --overwrite
    (io.check_out_dir), checked before any work; --resume continues the run already in OUT."""
    import os

    from unembed.io import check_out_dir

    # under a launcher only the first process checks: the others could see its first writes to OUT
    if getattr(args, "resume", False) or int(os.environ.get("RANK", "0")) > 0:
        return
    if what == "embedder":
        from unembed.embedders import EMBEDDER_FORMAT as model_format
    else:
        from unembed.decoders.base import DECODER_FORMAT as model_format
    check_out_dir(args.out, model_format, args.overwrite)


def add_workers_option(p) -> None:
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="decode and preprocess images in N worker processes, ahead of the model (default 0: in "
                   "this process)")


def add_dtype_option(p) -> None:
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="compute precision of the embedder and decoder (bf16 runs on CPU too; default fp32)")


def add_generation_options(p) -> None:
    """A flag per decoding option (unembed/generation.py holds their types, bounds and help); --sample is
    do_sample. What a decoder does not take is refused by its check, the same line as the library's."""
    from unembed.generation import GENERATION_OPTIONS

    group = p.add_argument_group("decoding options (each decoder takes its own; others are refused)")
    for name, option in GENERATION_OPTIONS.items():
        if option.type is bool:
            group.add_argument("--sample", dest=name, action="store_true", default=None, help=option.help)
        else:
            group.add_argument(f"--{name.replace('_', '-')}", dest=name, type=option.type,
                               help=f"{option.help}; {option.bounds()}")


def generation_args(args) -> dict:
    """The decoding options given on the command line (unchecked: the decoder's check_generation checks)."""
    from unembed.generation import GENERATION_OPTIONS

    return given(args, GENERATION_OPTIONS)
