"""Configs as dataclasses with command-line overrides: every field is a `--flag` with its help."""
import argparse
from dataclasses import MISSING, field, fields

from infra.errors import bounds, check_flags, flag_name


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (--help lists the flags)\n")


def parser(prog: str, doc: str) -> Parser:
    return Parser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def flag(default, help: str, lo=None, hi=None, choices=None):
    """A dataclass field that is also a documented command-line flag (a list default: one or more values);
    lo, hi: the bounds of a number (checked by config_from), choices: the values a string may take."""
    meta = {"help": help, "lo": lo, "hi": hi, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def add_flags(parser: argparse.ArgumentParser, cls) -> argparse.ArgumentParser:
    """One `--name-with-dashes` per field of `cls`, its help showing the default; bools that are on by default
    get `--x/--no-x`, the others are switches."""
    for f in fields(cls):
        default = f.default_factory() if f.default is MISSING else f.default
        name = flag_name(f.name)
        if isinstance(default, bool):  # off by default: a switch; on by default: --x / --no-x
            action = argparse.BooleanOptionalAction if default else "store_true"
            parser.add_argument(name, action=action, default=default,
                                help=f.metadata["help"] + f" (default: {'on' if default else 'off'})")
        elif isinstance(default, list):  # one or more values, of the default's element type
            kind = type(default[0]) if default else str
            parser.add_argument(name, nargs="+", type=kind, default=default,
                                help=f.metadata["help"] + f" (default: {' '.join(map(str, default)) or 'none'})")
        else:
            lo, hi = f.metadata.get("lo"), f.metadata.get("hi")
            limits = "" if lo is None and hi is None else f"; {bounds(lo, hi)}"
            parser.add_argument(name, type=type(default), default=default, choices=f.metadata.get("choices"),
                                help=f.metadata["help"] + f" (default: {default}{limits})")
    return parser


def config_from(cls, args: argparse.Namespace):
    """The config of the parsed flags, checked (infra.errors.check_flags: finite, inside their bounds)."""
    cfg = cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
    check_flags(cfg)
    return cfg
