"""The config base every stage's settings derive from: checks on creation, a strict
round trip, a format version, and flags whose help comes from the field."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from compactgpt.config import StageConfig, add_config_args, field_help, given_args, option
from compactgpt.errors import ConfigError


@dataclass
class ToyConfig(StageConfig):
    layers: int = option(2, "blocks to keep")
    rate: float = option(0.5, "share of something")
    fast: bool = option(False, "take the quick path")
    name: str | None = option(None, "an optional name")
    internal: int = option(7, "set by the stage itself", flag=False)

    def validate(self) -> None:
        if self.layers < 1:
            raise ConfigError(f"layers must be at least 1, got {self.layers}")


def test_checked_on_creation_and_on_replace():
    with pytest.raises(ConfigError, match="layers must be at least 1, got 0"):
        ToyConfig(layers=0)
    with pytest.raises(ConfigError, match="got -3"):
        ToyConfig().replace(layers=-3)


def test_round_trip_refuses_unknown_keys_and_newer_versions():
    cfg = ToyConfig(layers=3, name="x")
    assert ToyConfig.from_dict(cfg.to_dict()) == cfg
    assert ToyConfig.from_dict(cfg.versioned_dict()) == cfg  # the version key is understood
    with pytest.raises(ConfigError, match=r"prune: unknown settings \['layer'\]; known: .*'layers'"):
        ToyConfig.from_dict({"layer": 3}, "prune")
    with pytest.raises(ConfigError, match="format version 2"):
        ToyConfig.from_dict({"config_version": 2, "layers": 3})


def test_flags_come_from_the_fields():
    parser = argparse.ArgumentParser()
    add_config_args(parser, ToyConfig, skip=("rate",))
    text = parser.format_help()
    assert "blocks to keep" in text and "--name NAME" in text and "--fast, --no-fast" in text
    assert "--rate" not in text and "--internal" not in text  # skipped, and kept off the command line
    args = parser.parse_args(["--layers", "4", "--no-fast"])
    assert given_args(args, ToyConfig) == {"layers": 4, "fast": False}  # only what was given
    assert field_help(ToyConfig, "rate") == "share of something"


def test_an_added_field_at_its_default_leaves_the_fingerprint_alone():
    from dataclasses import dataclass

    from compactgpt.config import StageConfig, option

    @dataclass
    class Before(StageConfig):
        width: int = option(4, "w")

    @dataclass
    class After(StageConfig):
        width: int = option(4, "w")
        kernel: str = option("old", "k", added=True)

    assert After().fingerprint_dict() == Before().to_dict() and "kernel" in After().to_dict()
    assert After(kernel="new").fingerprint_dict() == {"width": 4, "kernel": "new"}
