"""CPU cost of Nystrom vs exact attention at MobileViT-S's token counts (224 px, unfold patch 2).

Prints, for each transformer stage of MobileViT-S (196, 49 and 16 tokens per sequence, 4 heads,
4 sequences per image), the time of one attention kernel call forward + backward, and the time of
the whole contextual branch forward + backward, for exact attention and Nystrom with a few
landmark counts and both pseudo-inverses. Used for docs/decisions/models.md:

    PYTHONPATH=src python scripts/nystrom_cost.py --threads 1 --batch 8

The variants are timed round-robin and each reports its fastest call, so that load from other
processes on a shared machine (which only ever adds time) disturbs the comparison least.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from cmafnet.models.mobilevit import MobileViT, MobileViTOptions
from cmafnet.models.nystrom import full_attention, nystrom_attention

# (tokens per sequence, head dim, layers) of MobileViT-S's three transformer stages at 224 px,
# 4 heads each.
STAGES = ((196, 36, 2), (49, 48, 4), (16, 60, 3))
VARIANTS: tuple[tuple[str, dict], ...] = (
    ("full", {}),
    ("nystrom m=8 iterative", {"num_landmarks": 8}),
    ("nystrom m=16 iterative", {"num_landmarks": 16}),
    ("nystrom m=16 exact", {"num_landmarks": 16, "pinv": "exact"}),
    ("nystrom m=32 iterative", {"num_landmarks": 32}),
    ("nystrom m=49 iterative", {"num_landmarks": 49}),
)


def kernel_step(n: int, d: int, batch: int, kw: dict) -> Callable[[], None]:
    # (B * p^2 sequences, 4 heads, N tokens, d_h)
    q, k, v = (torch.randn(batch * 4, 4, n, d, requires_grad=True) for _ in range(3))

    def step() -> None:
        if kw:
            out = nystrom_attention(q, k, v, scale=d**-0.5, **kw)
        else:
            out = full_attention(q, k, v, scale=d**-0.5)
        out.sum().backward()

    return step


def branch_step(batch: int, kw: dict) -> Callable[[], None]:
    torch.manual_seed(0)
    model = MobileViT("s", MobileViTOptions(attention="nystrom" if kw else "full", **kw)).train()
    x = torch.randn(batch, 3, 224, 224)
    return lambda: model(x).mean().backward()


def best_ms(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Fastest of ``repeats`` calls per step, the steps timed round-robin after one warm-up call."""
    for fn in steps.values():
        fn()
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(repeats):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], (time.perf_counter() - t0) * 1e3)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--branch-repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, fastest call")
    kernel = [
        best_ms({name: kernel_step(n, d, args.batch, kw) for name, kw in VARIANTS}, args.repeats)
        for n, d, _ in STAGES
    ]
    branch = best_ms({name: branch_step(args.batch, kw) for name, kw in VARIANTS}, args.branch_repeats)
    header = "".join(f"{f'N={n} x{layers}':>14}" for n, _, layers in STAGES)
    print(f"{'fwd+bwd ms':<26}{header}{'attn total':>12}{'branch':>10}")
    for name, _ in VARIANTS:
        per_stage = [k[name] for k in kernel]
        total = sum(t * layers for t, (_, _, layers) in zip(per_stage, STAGES, strict=True))
        cols = "".join(f"{t:>14.2f}" for t in per_stage)
        print(f"{name:<26}{cols}{total:>12.1f}{branch[name]:>10.0f}")


if __name__ == "__main__":
    main()
