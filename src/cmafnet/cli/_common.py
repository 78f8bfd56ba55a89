"""Helpers shared by subcommands."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from functools import partial
from typing import Any


def add_config_args(p: argparse.ArgumentParser) -> None:
    """``--config FILE`` and repeated ``--set key=value``."""
    p.add_argument("--config", help="YAML file or shipped config name (paper, smoke, ...)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.batch_size=64 (repeatable)",
    )  # fmt: skip


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")


def add_inference_args(p: argparse.ArgumentParser, evaluate: bool = False) -> None:
    """What evaluate, predict and wsi share: --device, --calibration, the test-time adaptations
    (``cmafnet.inference.adapt.Adaptation``) and, but for evaluate, --fast."""
    add_device_arg(p)
    if not evaluate:
        p.add_argument("--fast", action="store_true",
                       help="CUDA: bf16 autocast, channels-last and torch.compile (the first batch waits for the "
                            "compilation; probabilities differ from fp32 by bf16 rounding)")  # fmt: skip
    p.add_argument(
        "--calibration", choices=("auto", "on", "off"), default="auto",
        help="the run's temperature (run.json, fitted on its validation split by 'cmafnet evaluate'): auto "
        "applies it when fitted on >= 10 patients, on always, off never (T = 1); a stored threshold is mapped "
        "so its decisions stay the same",
    )  # fmt: skip
    g = p.add_argument_group("adapting to another site (docs/experiments.md, zero-shot)")
    g.add_argument("--stain-norm", choices=("run", "none", "macenko", "reinhard"), default="run",
                   help="stain normalisation of the inputs: as the run was trained (default), none, Macenko to "
                   "the run's reference, or Reinhard to the LAB statistics of its training patches")  # fmt: skip
    g.add_argument("--tta", choices=("none", "flips", "d4"), default="none",
                   help="test-time augmentation: mean probability over flips (4 views) or flips and 90 degree "
                   "rotations (d4, 8 views)")  # fmt: skip
    g.add_argument("--adabn", choices=("off", "on", "balanced") if evaluate else ("off", "on"), default="off",
                   help="re-estimate BatchNorm statistics on the target images before predicting (AdaBN); "
                   "their class mix then moves the statistics" + ("; balanced: on a class-balanced "
                   "sample (uses the labels)" if evaluate else ""))  # fmt: skip
    if evaluate:
        g.add_argument("--site-calibration", type=non_negative_int, default=0, metavar="K",
                       help="--zero-shot: refit temperature and threshold on K labelled target patients "
                       "(chosen by --seed), scored on the others only")  # fmt: skip
        g.add_argument(
            "--seed", type=non_negative_int, default=0, help="seed of --site-calibration / --adabn balanced"
        )


def predict_options(args: argparse.Namespace) -> Any:
    """The :class:`~cmafnet.inference.predict.PredictOptions` of a ``predict``, ``wsi`` or ``evaluate`` line."""
    from cmafnet.inference.adapt import Adaptation
    from cmafnet.inference.predict import PredictOptions

    adapt = Adaptation(stain=args.stain_norm, tta=args.tta, adabn=args.adabn,
                       site_patients=getattr(args, "site_calibration", 0), seed=getattr(args, "seed", 0))  # fmt: skip
    return PredictOptions(device=args.device, threshold=getattr(args, "threshold", None), calibrate=args.calibration,
                          fast=getattr(args, "fast", False), adapt=adapt, batch_size=args.batch)  # fmt: skip


def _number_range(cast: type, lo: float | None = None, hi: float | None = None) -> Callable[[str], Any]:
    """An argparse ``type``: a finite ``cast`` (int or float) in ``[lo, hi]`` (bad usage, exit 2, otherwise)."""
    what = "integer" if cast is int else "number"
    if lo is not None and hi is not None:
        bounds = f"in [{lo:g}, {hi:g}]"
    else:
        bounds = f">= {lo:g}" if lo is not None else f"<= {hi:g}"

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an' if cast is int else 'a'} {what}, got {text!r}"
            ) from None
        if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value if cast is int else text}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


int_range = partial(_number_range, int)
float_range = partial(_number_range, float)
positive_int = int_range(1)
non_negative_int = int_range(0)
probability = float_range(0.0, 1.0)


def microns_per_pixel(text: str) -> float:
    """An argparse ``type``: µm/px within :data:`cmafnet.data.scale.MPP_RANGE` (imported only when used)."""
    from cmafnet.data.scale import MPP_RANGE

    return float_range(*MPP_RANGE)(text)
