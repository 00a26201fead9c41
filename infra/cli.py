"""Configs as dataclasses with command-line overrides: every field is a `--flag` with its help."""
import argparse
from dataclasses import MISSING, field, fields


def flag(default, help: str):
    """A dataclass field that is also a documented command-line flag (a list default: one or more values)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def add_flags(parser: argparse.ArgumentParser, cls) -> argparse.ArgumentParser:
    """One `--name-with-dashes` per field of `cls`, its help showing the default; bools that are on by default
    get `--x/--no-x`, the others are switches."""
    for f in fields(cls):
        default = f.default_factory() if f.default is MISSING else f.default
        name = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):  # off by default: a switch; on by default: --x / --no-x
            action = argparse.BooleanOptionalAction if default else "store_true"
            parser.add_argument(name, action=action, default=default, help=f.metadata["help"])
        elif isinstance(default, list):  # one or more values, of the default's element type
            kind = type(default[0]) if default else str
            parser.add_argument(name, nargs="+", type=kind, default=default,
                                help=f.metadata["help"] + f" (default: {' '.join(map(str, default)) or 'none'})")
        else:
            parser.add_argument(name, type=type(default), default=default, help=f.metadata["help"] + f" (default: {default})")
    return parser


def config_from(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
