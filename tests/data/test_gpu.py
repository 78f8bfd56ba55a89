"""Opt-in CUDA checks of the data path (skipped without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmafnet.config import DataConfig
from cmafnet.data.loader import BatchLoader
from cmafnet.data.stain import MacenkoNormalizer
from cmafnet.data.transforms import GPUPreprocess

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_macenko_cuda_matches_cpu(idc_store) -> None:
    x = torch.from_numpy(np.asarray(idc_store.images[:256])).permute(0, 3, 1, 2)
    cpu = MacenkoNormalizer()(x)
    gpu = MacenkoNormalizer().cuda()(x.cuda()).cpu()
    assert (gpu - cpu).abs().mean() < 0.05


@pytest.mark.parametrize("resident", [True, False])
def test_loader_and_preprocess_on_cuda(idc_store, resident: bool) -> None:
    y, _ = idc_store.targets()
    loader = BatchLoader(
        idc_store.images, y, np.arange(len(y)), 512, shuffle=True, seed=0, device="cuda", resident=resident
    )
    pre = GPUPreprocess(DataConfig(), 224, train=True).cuda()
    seen = 0
    for x, yy, idx in loader:
        assert x.is_cuda and yy.is_cuda
        np.testing.assert_array_equal(
            x[:4].permute(0, 2, 3, 1).cpu().numpy(), idc_store.images[idx[:4].cpu().numpy()]
        )
        out = pre(x)
        assert out.shape == (len(x), 3, 224, 224) and torch.isfinite(out).all()
        seen += len(x)
    assert seen == len(y)
