"""Configs as dataclasses with command-line overrides: every field is a `--flag` with its help."""
import argparse
from dataclasses import field, fields


def flag(default, help: str):
    """A dataclass field that is also a documented command-line flag."""
    return field(default=default, metadata={"help": help})


def add_flags(parser: argparse.ArgumentParser, cls) -> argparse.ArgumentParser:
    """One `--name-with-dashes` per field of `cls`; bools get `--x/--no-x`."""
    for f in fields(cls):
        name = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            parser.add_argument(name, type=type(f.default), default=f.default, help=f.metadata["help"] + f" (default: {f.default})")
    return parser


def config_from(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
