"""`cmafnet report`: one self-contained HTML report (plus Markdown and JSON) over run folders."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="HTML/Markdown/JSON report over evaluated run folders",
        description="Collect the metrics, predictions and training history of run folders into "
        "report.html (self-contained: figures embedded, no external resources), report.md and "
        "report.json. Run 'cmafnet evaluate' on each run first for metric tables and curves.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--title", default="cmafnet report")
    p.add_argument(
        "--compare", nargs=2, action="append", metavar=("A", "B"), default=None,
        help="run names (folder names) to compare by exact McNemar (repeatable); default: every pair "
        "evaluated on the same images",
    )  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cmafnet.evaluation.report import write_report

    pairs = [tuple(x) for x in args.compare] if args.compare else None
    path = write_report(args.run_dirs, args.out, title=args.title, compare=pairs)
    print(f"wrote {path} (+ report.md, report.json, figures/)")
    return 0
