"""The base of every stage's settings: one dataclass per stage, checked on creation, saved
into the artifact it produced, and mapped one-to-one to command-line flags.

A field's help text lives on the field (`option(default, "help")`), so the flag's --help,
the docs and the saved settings cannot drift apart:

    @dataclass
    class PruneConfig(StageConfig):
        layers: int = option(0, "transformer blocks to keep (0 = all)")

        def validate(self) -> None:
            if self.layers < 0:
                raise ConfigError(...)

`to_dict` / `from_dict` round-trip through plain JSON values; `from_dict` refuses keys the
config does not know (a typo never silently becomes a default) and settings written by a
newer format version than this code reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import MISSING, asdict, dataclass, field
from typing import Any, ClassVar, TypeVar

from .errors import ConfigError

C = TypeVar("C", bound="StageConfig")

VERSION_KEY = "config_version"


def option(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING, flag: bool = True,
           metavar: str | None = None, saved: bool = True, added: bool = False, parse: Any = None) -> Any:
    """A config field with its help text. flag=False keeps it off the command line (set by the
    stage itself or only through the Python API / a config file). parse: the flag's argparse
    type, where a bad value should be refused while the flags are parsed (e.g. positive_int);
    by default the field's type. saved=False keeps it out of
    `to_dict` (so out of manifests and pipeline fingerprints): for settings of where a stage
    runs, such as its device, that do not change what it writes. added=True marks a field added
    after artifacts were made whose default computes what the stage computed before it existed:
    `fingerprint_dict` leaves it out at that default, so pipeline runs made earlier stay up to date."""
    metadata = {"help": help, "flag": flag, "saved": saved, "added": added}
    if metavar:
        metadata["metavar"] = metavar
    if parse is not None:
        metadata["type"] = parse
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# How a stage runs, not what it writes: each stage's config holds those it takes as unsaved
# fields (run_option), so one config describes a whole run while the manifest and the
# pipeline's fingerprint stay the same whatever they are. Name -> (default, help).
RUN_SETTINGS: dict[str, tuple[Any, str]] = {
    "threads": (None, "CPU threads for this run (default: PyTorch's own count)"),
    "overwrite": (False, "replace an artifact already in --out (never an input folder)"),
    "resume": (False, "continue from OUT/checkpoint with its settings (starts fresh when there is none yet)"),
    "progress": (True, "progress bars on a terminal (--no-progress: none)"),
}


def run_option(name: str, help: str = "") -> Any:
    """The unsaved field of run setting `name` (RUN_SETTINGS), with its shared help text or
    `help`. `threads` is checked as the flag is parsed (an integer of 1 or more)."""
    default, text = RUN_SETTINGS[name]
    return option(default, help or text, saved=False, parse=threads if name == "threads" else None)


@dataclass
class StageConfig:
    """Settings of one stage. Subclasses add fields with `option` and checks in `validate`."""

    # Bumped when a field changes meaning; settings saved by a newer version are refused.
    config_version: ClassVar[int] = 1
    # Fields renamed after artifacts were made: {current name: the name saved before}.
    # from_dict reads the old name (settings saved before the rename), and fingerprint_dict
    # writes it, so pipeline runs made before the rename stay up to date.
    renamed: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        self.check_numbers()
        self.validate()

    def check_numbers(self) -> None:
        """ConfigError for a NaN or infinite number in any field (comparisons with NaN are all
        false, so range checks in `validate` would let it through) and for a `seed` outside
        0..2**63-1 (numpy's generators refuse negative seeds, torch's overflow past 2**64) or
        `threads` below 1. Called on creation, before `validate`."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")
            if f.name == "seed" and isinstance(value, int) and not 0 <= value < 2**63:
                raise ConfigError(f"seed must be an integer from 0 to 2**63-1, got {value}")
            if f.name == "threads" and isinstance(value, int) and value < 1:
                raise ConfigError(f"threads must be 1 or more (None: PyTorch's own count), got {value}")

    def validate(self) -> None:
        """Raise ConfigError naming the bad setting and the fix; called on creation."""

    def to_dict(self) -> dict:
        """The saved settings: every field but those declared with `option(saved=False)`."""
        unsaved = {f.name for f in dataclasses.fields(self) if not f.metadata.get("saved", True)}
        return {k: v for k, v in asdict(self).items() if k not in unsaved}

    def fingerprint_dict(self) -> dict:
        """`to_dict` without the fields declared `added` that hold their default, under the
        names fields had before a rename (`renamed`): what decides whether a pipeline stage
        is up to date."""
        unchanged = {f.name for f in dataclasses.fields(self)
                     if f.metadata.get("added") and _default_of(f) is not MISSING
                     and getattr(self, f.name) == _default_of(f)}
        return {self.renamed.get(k, k): v for k, v in self.to_dict().items() if k not in unchanged}

    def versioned_dict(self) -> dict:
        """to_dict with the format version, for settings stored on their own (config.json)."""
        return {VERSION_KEY: self.config_version, **self.to_dict()}

    @classmethod
    def from_dict(cls: type[C], values: dict, where: str = "", **fixed: Any) -> C:
        """Build from saved or configured settings. Unknown keys are errors that name the
        known ones; `fixed` values are set by the caller and are not the user's to give."""
        values = dict(values)
        version = values.pop(VERSION_KEY, 1)
        label = where or cls.__name__
        for new, old in cls.renamed.items():
            if old in values:
                if new in values:
                    raise ConfigError(f"{label}: {old!r} is the old name of {new!r}; give only {new!r}")
                values[new] = values.pop(old)
        if not isinstance(version, int) or version > cls.config_version:
            raise ConfigError(
                f"{label}: settings of format version {version!r}, but this CompactGPT reads version "
                f"{cls.config_version} and older; upgrade CompactGPT or rerun the stage that wrote them"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{label}: unknown settings {unknown}; known: {sorted(known - set(fixed))}")
        return cls(**{**values, **fixed})

    def replace(self: C, **changes: Any) -> C:
        """A copy with some settings changed, checked again."""
        return dataclasses.replace(self, **changes)


def _default_of(f: dataclasses.Field) -> Any:
    """A field's default value (a fresh one from its factory), or MISSING."""
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING


def field_help(cls: type, name: str) -> str:
    """The help text of one field of a config class."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(name)


# ---------------------------------------------------------------------------------------
# argparse types: a bad number is refused while the flags are parsed, as
# `error: argument --top-k: must be an integer >= 0, got -5` (exit status 2), instead of
# failing later with a traceback or being silently replaced by a default.


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def finite_float(text: str) -> float:
    """A float that is not NaN or infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _integer_in(low: int, high: int | None, what: str):
    """An argparse type for integers in [low, high] (high None: no upper bound)."""

    def parse(text: str) -> int:
        value = _integer(text)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    return parse


positive_int = _integer_in(1, None, "a positive integer (1 or more)")
non_negative_int = _integer_in(0, None, "an integer >= 0")
threads = _integer_in(1, None, "a thread count of 1 or more")
seed = _integer_in(0, 2**63 - 1, "an integer from 0 to 2**63-1")  # what every torch generator accepts


def non_negative_float(text: str) -> float:
    """A finite float >= 0."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def probability(text: str) -> float:
    """A share in (0, 1]: a nucleus threshold, a fraction that cannot be empty."""
    value = finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text}")
    return value


def open_fraction(text: str) -> float:
    """A share strictly between 0 and 1 (a held-out fraction: both sides must be non-empty)."""
    value = finite_float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1 (exclusive), got {text}")
    return value


def _flag_type(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    tp = args[0] if args else tp  # Optional[int] / int | None -> int
    # NaN and inf parse as floats; range checks are the config's own (validate).
    return finite_float if tp is float else tp


def add_config_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                    skip: tuple[str, ...] = (), show_defaults: bool = False) -> None:
    """One --flag per field of `cls` (help text from the field). Defaults are None so that only
    the flags given override a preset, a saved checkpoint or a method's own defaults; the
    field's default can be shown in the help instead (show_defaults; leave it off where a
    preset or a method supplies other defaults)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("flag", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = f.metadata.get("type") or _flag_type(hints[f.name])
        text = f.metadata.get("help", "")
        if show_defaults and f.default is not MISSING and f.default not in (None, ""):
            text = f"{text} (default {f.default})" if text else f"default {f.default}"
        text = text.replace("%", "%%")
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            metavar = f.metadata.get("metavar") or f.name.upper()
            # A list field (e.g. bench's models) takes one or more values: --models A B.
            nargs = "+" if typing.get_origin(hints[f.name]) is list else None
            parser.add_argument(flag, dest=f.name, type=tp, default=None, help=text, metavar=metavar, nargs=nargs)


def given_args(args: argparse.Namespace, cls: type, skip: tuple[str, ...] = ()) -> dict:
    """The fields of `cls` that were given on the command line (not None)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if f.name not in skip and getattr(args, f.name, None) is not None}
