"""`cmafnet ingest {idc,breakhis,folder} SRC --out STORE`: decode a dataset once into a packed store."""

from __future__ import annotations

import argparse

from cmafnet.cli._common import microns_per_pixel, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="decode a dataset once into a packed patch store",
        description="Decode every image once (in parallel) into STORE: images.npy (uint8 N,H,W,3), "
        "index.csv, meta.json, rejected.csv. Re-running on the same source resumes or is a no-op.",
    )
    p.add_argument("dataset", choices=["idc", "breakhis", "folder"], help="source layout")
    p.add_argument(
        "src", help="dataset root (folder: <class>/<images> or a CSV manifest path,label[,patient])"
    )
    p.add_argument("--out", required=True, help="store folder to write")
    p.add_argument(
        "--workers", type=positive_int, default=None, help="decoding processes (default: CPU count, max 16)"
    )
    p.add_argument("--strict", action="store_true", help="exit 3 if any file is rejected")
    p.add_argument(
        "--size", default=None, metavar="HxW", help="store size; images are resized to it (default: native)"
    )
    p.add_argument("--force", action="store_true", help="overwrite a store made from another source")
    p.add_argument(
        "--mpp", type=microns_per_pixel, default=None, metavar="M",
        help="microns per pixel of the source images (folder data; for idc it replaces the documented 4.0, for "
        "breakhis it is the 40X value, the others scaled by 40/M); recorded per image in the store",
    )  # fmt: skip
    p.add_argument(
        "--patient-regex", default=None, metavar="RE",
        help="folder data: the patient id from the file name (named group 'patient', else group 1, else the "
        "match); without it or a manifest 'patient' column or <class>/<patient>/ folders each image is its own patient",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cmafnet.data.ingest import ingest, parse_size, summary_lines

    meta = ingest(
        args.dataset, args.src, args.out, workers=args.workers, strict=args.strict,
        size=parse_size(args.size), force=args.force, progress=not args.no_progress, mpp=args.mpp,
        patient_regex=args.patient_regex,
    )  # fmt: skip
    if meta.get("noop"):
        print(f"{args.out}: up to date with {args.src} (nothing to do)")
    for line in summary_lines(meta):
        print(line)
    print(f"store: {args.out} (hash {meta['store_hash'][:12]})")
    return 0
