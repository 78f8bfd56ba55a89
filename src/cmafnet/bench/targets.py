"""Ratios, targets and the printed table of a bench result."""

from __future__ import annotations

from typing import Any

# (name, description, comparison, threshold): the bench's targets (one H100/H200, 224 px, bf16)
TARGETS = (
    ("train_vs_naive", "CMAF-Net stage-3 train step throughput / naive reference", ">=", 1.4),
    ("infer_vs_naive_eager", "CMAF-Net inference throughput / naive reference eager", ">=", 2.0),
    ("data_overhead_pct", "real data path epoch vs pre-made tensors, overhead %", "<=", 10.0),
    ("sam_vs_plain", "CMAF-Net SAM step time / plain step time", "<=", 2.1),
    ("batch1_latency_ms", "CMAF-Net batch-1 latency (best of eager / CUDA graph / compiled), ms", "<=", 4.0),
)


def _best(*vals: float | None, low: bool = False) -> float | None:
    return (min if low else max)((v for v in vals if v is not None), default=None)


def _best_variant(models: dict[str, dict], key: str) -> tuple[str | None, float | None]:
    """The CMAF-Net variant (eager, +graph, +compile, ...) with the highest ``key``, and its value."""
    vals = [(k, m[key]) for k, m in models.items() if k.split("+")[0] == "cmafnet" and m.get(key)]
    return max(vals, key=lambda kv: kv[1]) if vals else (None, None)


def compute_ratios(models: dict[str, dict], data: dict | None) -> dict[str, Any]:
    """Target ratios: "best" is the fastest CMAF-Net variant measured (eager, whole-step CUDA graph,
    compiled, compiled + graph); the naive reference is always eager."""
    c = models.get("cmafnet", {})
    n = models.get("naive", {})
    variants = [m for k, m in models.items() if k.split("+")[0] == "cmafnet"]

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    best_train, train_img_s = _best_variant(models, "train_img_s")
    best_infer, infer_img_s = _best_variant(models, "infer_img_s")
    return {
        "train_vs_naive": ratio(train_img_s, n.get("train_img_s")),
        "train_best_variant": best_train,
        "train_vs_naive_eager_only": ratio(c.get("train_img_s"), n.get("train_img_s")),
        "infer_vs_naive_eager": ratio(infer_img_s, n.get("infer_img_s")),
        "infer_best_variant": best_infer,
        "infer_vs_naive_eager_eager_only": ratio(c.get("infer_img_s"), n.get("infer_img_s")),
        "sam_vs_plain": _best(
            *(ratio(m.get("sam_step_ms"), m.get("train_step_ms")) for m in variants), low=True
        ),
        "batch1_latency_ms": _best(
            *(
                m.get(k)
                for m in variants
                for k in ("latency_ms", "latency_cuda_graph_ms", "latency_compiled_ms")
            ),
            low=True,
        ),
        "data_overhead_pct": (data or {}).get("overhead_pct"),
        "train_vs_resnet18": ratio(c.get("train_img_s"), models.get("resnet18", {}).get("train_img_s")),
        "train_vs_mobilevit_s": ratio(c.get("train_img_s"), models.get("mobilevit_s", {}).get("train_img_s")),
    }


def check_targets(values: dict[str, float | None], targets: tuple = TARGETS) -> list[dict[str, Any]]:
    """Each ``(name, description, op, threshold)`` target with its value and whether it passed (None:
    not measured)."""
    return [
        {
            "name": n,
            "description": d,
            "value": (v := values.get(n)),
            "op": op,
            "threshold": t,
            "passed": None if v is None else (v >= t if op == ">=" else v <= t),
        }
        for n, d, op, t in targets
    ]


def _num(v: Any, fmt: str = "{:,.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def format_report(result: dict[str, Any]) -> str:
    """The human-readable table printed by the command."""
    env = result["environment"]
    lines = [
        f"cmafnet bench on {env['device_name']} ({env['device']}), torch {env['torch']}, timm {env['timm']}, "
        f"{env['size']} px, batch {env['batch']} (infer {env['infer_batch']}), amp {env['amp']}, "
        f"{env['steps']} steps after {env['warmup']} warm-up",
        "",
        f"{'model':<23}{'train img/s':>12}{'SAM img/s':>11}{'infer img/s':>12}{'+aux':>9}{'lat ms':>8}"
        f"{'graph ms':>9}{'comp ms':>8}{'peak GiB':>9}{'params M':>9}{'GMACs':>7}",
    ]
    for name, m in result["models"].items():
        lines.append(
            f"{name:<23}{_num(m.get('train_img_s')):>12}{_num(m.get('train_sam_img_s')):>11}"
            f"{_num(m.get('infer_img_s')):>12}{_num(m.get('infer_aux_img_s')):>9}"
            f"{_num(m.get('latency_ms'), '{:.2f}'):>8}{_num(m.get('latency_cuda_graph_ms'), '{:.2f}'):>9}"
            f"{_num(m.get('latency_compiled_ms'), '{:.2f}'):>8}{_num(m.get('train_peak_GiB'), '{:.2f}'):>9}"
            f"{_num(m.get('params_M'), '{:.2f}'):>9}{_num(m.get('gmacs'), '{:.2f}'):>7}"
        )
        if m.get("breakdown_ms"):
            parts = ", ".join(f"{k} {v:.1f}" for k, v in m["breakdown_ms"].items())
            lines.append(f"  step parts, ms: {parts}")
        for k, e in m.get("errors", {}).items():
            lines.append(f"  ! {k}: {e}")
    if result.get("switches"):
        lines += ["", "fast-path switches (speed-up = with / without):"]
        for sw, entries in result["switches"].items():
            for who, e in entries.items():
                parts = [
                    f"{m.replace('_img_s', '')} x{v['speedup']:.2f}"
                    for m, v in e.items()
                    if isinstance(v, dict) and v.get("speedup")
                ]
                lines.append(f"  {sw:<28}{who:<13}{', '.join(parts) or 'n/a'}")
    d = result.get("data_path")
    if d:
        lines += ["", "data path:"]
        if "overhead_pct" in d:
            lines.append(
                f"  {d['steps']} steps of {d['epoch_steps']} ({d['store_size']:,} patches): end-to-end "
                f"{d['end_to_end_step_ms']:.1f} ms/step, pre-made {d['premade_step_ms']:.1f} ms/step, "
                f"overhead {d['overhead_pct']:.1f}%, input path alone {d['data_only_img_s']:,.0f} img/s, "
                f"epoch ~{d['epoch_estimate_s']:.0f} s"
            )
        for k, e in d.get("errors", {}).items():
            lines.append(f"  ! {k}: {e}")
    lines += ["", "targets:"]
    for t in result["targets"]:
        state = {True: "PASS", False: "FAIL", None: "n/a "}[t["passed"]]
        v = "-" if t["value"] is None else f"{t['value']:.3g}"
        lines.append(f"  {state}  {t['name']:<22}{v:>8} {t['op']} {t['threshold']}   {t['description']}")
    return "\n".join(lines)


def count_errors(obj: Any) -> int:
    """Number of failed measurements anywhere in a result (entries of every ``errors`` dict)."""
    if isinstance(obj, dict):
        own = len(obj["errors"]) if isinstance(obj.get("errors"), dict) else 0
        return own + sum(count_errors(v) for k, v in obj.items() if k != "errors")
    return 0
