"""`cmafnet split` (placeholder: replaced by the module that implements it)."""

from __future__ import annotations

import argparse

from cmafnet.errors import CmafnetError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("split", help="(not yet available)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise CmafnetError("'cmafnet split' is not implemented yet")
