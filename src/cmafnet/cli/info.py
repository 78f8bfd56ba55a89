"""``cmafnet info``: parameters per component and MACs per image of the configured model; ``--foundation``:
the catalogue of pathology foundation models a probe can read (``cmafnet.models.foundation``).

MACs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions, linear layers and
attention matmuls; element-wise ops are not counted) on one image, with attention forced onto the
math SDPA backend so that its matmuls are seen; MACs = counted FLOPs / 2.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from cmafnet.cli._common import add_config_args, int_range


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="parameters per component and MACs per image of a configured model",
        description="Build the model of a config and print its parameters per component and MACs per image.",
    )
    add_config_args(p)
    p.add_argument(
        "--size", type=int_range(32), default=None, help="input side in pixels (default: model.img_size)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--foundation", nargs="*", metavar="NAME",
        help="list the pathology foundation models a probe can read (model.probe.foundation), or show NAME's "
        "entry: Hub repository, architecture, embedding, input, normalisation, microns per pixel, licence, sources",
    )  # fmt: skip
    p.set_defaults(func=run)


def foundation_table(entries: list[Any]) -> str:
    """The catalogue as a table, one line per model."""
    w = max(len(e.hub) for e in entries) + 2
    head = f"{'name':<14}{'model':<16}{'embedding':<16}{'px':>4}{'um/px':>7}  {'gated':<6}{'hub':<{w}}licence"
    rows = [
        f"{e.key:<14}{e.name:<16}{f'{e.embedding} {e.dim}':<16}{e.img_size:>4}{e.mpp:>7g}  "
        f"{'yes' if e.gated else 'no':<6}{e.hub:<{w}}{e.licence}"
        for e in entries
    ]
    note = (
        "model.probe.foundation=NAME picks one (docs/foundation.md); gated models need the licence accepted on "
        "the Hub and a login, or a local file: model.probe.backbone=/path"
    )
    return "\n".join([head, *rows, note])


def _foundation(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from cmafnet.models.foundation import catalogue, foundation_entry

    entries = [foundation_entry(n, "--foundation") for n in args.foundation] or list(catalogue().values())
    if args.json:
        print(json.dumps([asdict(e) for e in entries], indent=2))
    elif args.foundation:
        for e in entries:
            print("\n".join(f"{k:<11}{v}" for k, v in asdict(e).items()), end="\n\n")
    else:
        print(foundation_table(entries))
    return 0


def model_info(model: Any, size: int, name: str | None = None) -> dict[str, Any]:
    """Parameters per role (or per top-level child) and MACs per image at ``size`` x ``size``."""
    import torch

    from cmafnet.models.complexity import NOTE, counting

    x = torch.randn(1, 3, size, size)
    with counting(model) as counter:
        model(x)
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}

    def flops(module: Any, path: str) -> int:
        # A module called directly is counted under its path; one whose parent called only its
        # children (e.g. ``backbone.forward_features``) is the sum over those children.
        if path in counts:
            return counts[path]
        return sum(flops(child, f"{path}.{n}") for n, child in module.named_children())

    root = type(model).__name__
    # Components: top-level children of the model, so params and MACs come from the same partition.
    components: dict[str, dict[str, float]] = {
        cname: {"params": n, "macs": flops(child, f"{root}.{cname}") // 2}
        for cname, child in model.named_children()
        if (n := sum(p.numel() for p in child.parameters()))
    }
    if own := sum(p.numel() for p in model.parameters(recurse=False)):
        components["(direct)"] = {"params": own, "macs": 0}
    total_macs = counter.get_total_flops() // 2
    rest = total_macs - sum(c["macs"] for c in components.values())
    if rest > 0:  # ops in the model's own forward outside any child module
        components["(other ops)"] = {"params": 0, "macs": rest}
    return {
        "model": name or root,
        "input_size": size,
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "macs_per_image": total_macs,
        "components": components,
        "note": NOTE,
    }


def format_table(info: dict[str, Any]) -> str:
    rows = [f"{'component':<16}{'params (M)':>12}{'MACs (G)':>12}"]
    for name, c in info["components"].items():
        rows.append(f"{name:<16}{c['params'] / 1e6:>12.3f}{c['macs'] / 1e9:>12.3f}")
    rows.append("-" * 40)
    rows.append(f"{'total':<16}{info['params_total'] / 1e6:>12.3f}{info['macs_per_image'] / 1e9:>12.3f}")
    head = f"model {info['model']} at {info['input_size']}x{info['input_size']} px, per image"
    return "\n".join([head, *rows, f"({info['note']})"])


def run(args: argparse.Namespace) -> int:
    from cmafnet.config import load_config
    from cmafnet.models import create_model

    if args.foundation is not None:
        return _foundation(args)
    cfg = load_config(args.config or "paper", args.overrides)
    size = args.size or cfg.model.img_size  # both >= 32 (--size's type, model.img_size's bound)
    model = create_model(cfg.model)
    info = model_info(model, size, name=cfg.model.name)
    print(json.dumps(info, indent=2) if args.json else format_table(info))
    return 0
