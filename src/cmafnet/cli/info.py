"""``cmafnet info``: parameters per component and MACs per image of the configured model.

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
    p.set_defaults(func=run)


def model_info(model: Any, size: int, name: str | None = None) -> dict[str, Any]:
    """Parameters per role (or per top-level child) and MACs per image at ``size`` x ``size``."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    total_params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Components: top-level children of the model, so params and MACs come from the same partition.
    components: dict[str, dict[str, float]] = {}
    for cname, child in model.named_children():
        n = sum(p.numel() for p in child.parameters())
        if n:
            components[cname] = {"params": n, "macs": 0}
    own = sum(p.numel() for p in model.parameters(recurse=False))
    if own:
        components["(direct)"] = {"params": own, "macs": 0}

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(x)
    model.train(was_training)
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}

    def flops(module: Any, path: str) -> int:
        # A module called directly is counted under its path; one whose parent called only its
        # children (e.g. ``backbone.forward_features``) is the sum over those children.
        if path in counts:
            return counts[path]
        return sum(flops(child, f"{path}.{n}") for n, child in module.named_children())

    root = type(model).__name__
    for cname, child in model.named_children():
        if cname in components:
            components[cname]["macs"] = flops(child, f"{root}.{cname}") // 2
    total_macs = counter.get_total_flops() // 2
    rest = total_macs - sum(c["macs"] for c in components.values())
    if rest > 0:  # ops in the model's own forward outside any child module
        components["(other ops)"] = {"params": 0, "macs": rest}
    return {
        "model": name or root,
        "input_size": size,
        "params_total": total_params,
        "params_trainable": trainable,
        "macs_per_image": total_macs,
        "components": components,
        "note": "MACs = FlopCounterMode FLOPs / 2 (conv, linear, matmul; element-wise ops not counted)",
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
    from cmafnet.errors import ConfigError
    from cmafnet.models import create_model

    cfg = load_config(args.config or "paper", args.overrides)
    size = args.size or cfg.model.img_size
    if size < 32:
        raise ConfigError(f"--size: must be >= 32 (got {size})")
    model = create_model(cfg.model)
    info = model_info(model, size, name=cfg.model.name)
    print(json.dumps(info, indent=2) if args.json else format_table(info))
    return 0
