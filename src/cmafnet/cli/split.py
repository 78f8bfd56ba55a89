"""`cmafnet split STORE --by patient --ratios 0.7 0.1 0.2 --seed S --out SPLIT.json`."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "split",
        help="patient-level stratified train/val/test split of a store",
        description="Split a store by patient, stratified on each patient's majority class, and save "
        "it once (patients, indices, store hash, seed, ratios). Every run reuses the file.",
    )
    p.add_argument("store", help="store folder made by 'cmafnet ingest'")
    p.add_argument("--by", choices=["patient"], default="patient", help="grouping unit (patient only)")
    p.add_argument("--ratios", type=float, nargs=3, default=[0.7, 0.1, 0.2], metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--label-kind", choices=["label", "subtype"], default="label", help="classes to stratify on"
    )
    p.add_argument("--out", required=True, help="split JSON file to write")
    p.add_argument("--force", action="store_true", help="replace an existing different split file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cmafnet.data.safety import check_output_file
    from cmafnet.data.splits import SPLITS, save_split, split_store
    from cmafnet.data.store import PatchStore
    from cmafnet.errors import ConfigError

    check_output_file(args.out, "--out", example="split.json")
    store = PatchStore.open(args.store)
    try:
        split = split_store(store, ratios=tuple(args.ratios), seed=args.seed, label_kind=args.label_kind)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    save_split(split, args.out, overwrite=args.force)
    n_pat = sum(len(v) for v in split.patients.values())
    for s in SPLITS:
        idx = split.indices(s)
        counts = ", ".join(f"{k} {v:,}" for k, v in split.class_counts[s].items())
        print(f"{s:5s}: {len(split.patients[s]):4d} patients ({len(split.patients[s]) / n_pat:5.1%}), "
              f"{len(idx):8,} images: {counts}")  # fmt: skip
    print(f"split: {args.out} (store {store.store_hash[:12]}, seed {args.seed})")
    if split.note:
        print(f"WARNING {split.note}")
    return 0
