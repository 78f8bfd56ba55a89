"""CMAF-Net on a CUDA device: the paper model at 224 px under bf16/fp16 autocast, channels_last,
SDPA kernels and gradient checkpointing. Skipped without a GPU (``-m gpu`` selects these)."""

from __future__ import annotations

import pytest
import torch

from cmafnet.config import load_config
from cmafnet.models import create_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("attention", ["full", "nystrom"])
def test_paper_model_autocast_channels_last(dtype: torch.dtype, attention: str) -> None:
    torch.manual_seed(0)
    cfg = load_config("paper", [f"model.contextual.attention={attention}"])
    model = create_model(cfg.model).cuda().to(memory_format=torch.channels_last).train()
    x = torch.randn(8, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=dtype):
        out = model(x, return_aux=True)
        loss = out.logits.float().square().mean() + sum(
            v.float().square().mean() for v in out.aux_logits.values()
        )
    loss.backward()
    assert out.logits.shape == (8, 2) and out.attn.shape == (8, 8, 49, 49)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_plain_sdpa_path_matches_explicit_attention_on_gpu() -> None:
    torch.manual_seed(0)
    model = create_model(load_config("paper").model).cuda().eval()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        plain = model(x).float()
        full = model(x, return_aux=True).logits.float()
    torch.testing.assert_close(plain, full, rtol=0.05, atol=0.05)


def test_grad_checkpointing_same_gradients() -> None:
    torch.manual_seed(0)
    cfg = load_config("paper", ["model.bottleneck=false", "model.head.dropout=0"])
    model = create_model(cfg.model).cuda().eval()  # eval: BN statistics fixed, no sampling
    x = torch.randn(2, 3, 224, 224, device="cuda")
    model(x).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    for m in (model.spatial, model.contextual):
        m.train()  # checkpointing acts in training mode only
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.eval()
    model(x).sum().backward()
    for n, g in ref.items():
        torch.testing.assert_close(model.get_parameter(n).grad, g, rtol=1e-3, atol=1e-4, msg=n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nystrom_iterative_pinv_replays_from_a_cuda_graph(dtype: torch.dtype) -> None:
    """The paper's Nystrom layer (iterative pseudo-inverse) has no host sync: it can be captured
    (train.cuda_graph, the bench's graphed step) and replays what eager computes."""
    from cmafnet.models.nystrom import SelfAttention

    torch.manual_seed(0)
    layer = SelfAttention(144, 4, kind="nystrom", num_landmarks=16).cuda().eval()
    static_x = torch.randn(32, 196, 144, device="cuda")  # MobileViT-S stage 3 at 224 px
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        with torch.cuda.stream(side):
            for _ in range(2):
                layer(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        x = torch.randn_like(static_x)
        static_x.copy_(x)
        graph.replay()
        expected = layer(x)
    torch.testing.assert_close(static_y, expected)
    assert torch.isfinite(static_y.float()).all()
