"""Helpers shared by subcommands."""

from __future__ import annotations

import argparse


def add_config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    """``--config FILE`` and repeated ``--set key=value``."""
    p.add_argument("--config", required=required, help="YAML file or shipped config name (paper, smoke, ...)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.batch_size=64 (repeatable)",
    )  # fmt: skip


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
