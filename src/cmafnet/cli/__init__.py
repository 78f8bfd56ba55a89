"""The ``cmafnet`` command. Each subcommand lives in its own module under ``cmafnet.cli``.

Every module exposes ``add_parser(subparsers)`` which registers the subcommand and sets
``func(args) -> int``. Heavy imports (torch, timm) happen inside ``func`` so that ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import NoReturn

from cmafnet import __version__
from cmafnet.errors import CmafnetError

# Order is the order shown by ``cmafnet --help``.
COMMANDS = (
    "demo", "info", "ingest", "split", "train", "evaluate", "report", "experiment",
    "predict", "wsi", "export", "bench",
)  # fmt: skip


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (the full usage is one ``--help`` away).

    Subcommand parsers inherit the class, so every bad argument exits 2 with one line.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cmafnet",
        description="Train, compare and deploy imbalance-aware histopathology classifiers (CMAF-Net).",
        epilog="Exit codes: 0 ok, 1 runtime failure, 2 bad usage/config, 3 bad input data, "
        "4 missing or mismatched run/store/split, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"cmafnet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"cmafnet.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version or a usage error: argparse has printed it
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CmafnetError as err:
        print(f"cmafnet {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"cmafnet {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # the environment (disk full, permissions, a vanished file): one line
        if args.verbose:
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(
            f"cmafnet {args.command}: error: {where}{err.strerror or err} (-v for details)", file=sys.stderr
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
