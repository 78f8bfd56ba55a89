"""The probe model: contract, frozen backbone kept out of the state dict (and checked on rebuild), the kNN head
against scikit-learn, a linear probe learning a separable task, and resampling to the backbone's scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmafnet.config import KNNConfig
from cmafnet.errors import ConfigError
from cmafnet.models import create_model
from cmafnet.models.foundation import embed
from cmafnet.models.output import ModelOutput
from cmafnet.models.probe import KNNHead, tile_starts

STAND_IN = {
    "backbone": "random", "arch": "vit_tiny_patch16_224", "embedding": "cls+mean", "native_mpp": 0.5,
    "arch_kwargs": {"img_size": 32, "patch_size": 8, "depth": 1},
}  # fmt: skip


def _probe(**probe) -> torch.nn.Module:
    return create_model("probe", img_size=32, num_classes=3, probe={**STAND_IN, **probe}).eval()


def test_contract_frozen_backbone_and_a_head_only_state_dict() -> None:
    model = _probe()
    x = torch.randn(2, 3, 32, 32)
    out = model(x, return_aux=True)
    assert isinstance(out, ModelOutput) and out.logits.shape == (2, 3) and out.pre_logits.shape == (2, 384)
    z = model.forward_features(x)
    assert torch.equal(model.forward_features(z), z)  # embeddings pass through: what the trainer feeds
    assert torch.allclose(model.forward_head(z), model(z), atol=1e-6) and torch.allclose(model(z), out.logits)
    assert set(model.param_groups_by_role()) == {"head"}
    assert all(not p.requires_grad for p in model.backbone.parameters())
    model.train()
    assert not model.backbone.training and model.head.training
    assert set(model.state_dict()) == {"head.weight", "head.bias"}
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.num_classes == 5


def test_a_rebuilt_probe_checks_the_backbone_it_was_trained_on() -> None:
    model = _probe()
    torch.nn.init.normal_(model.head.weight)
    again = _probe(fingerprint=model.fingerprint)
    again.load_state_dict(model.state_dict())  # strict: the backbone is not missing, it is rebuilt
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(again(x), model(x))
    with pytest.raises(ConfigError, match=r"^model.probe.fingerprint: the backbone random now has weights"):
        _probe(fingerprint="0" * 32)


def test_probe_options_refused_in_one_line() -> None:
    with pytest.raises(
        ConfigError, match=r"model.weights: a probe's frozen weights go to model.probe.backbone"
    ):
        create_model("probe", img_size=32, weights="x.safetensors", probe=STAND_IN)
    with pytest.raises(ConfigError, match=r"model.probe.head=knn is fit from cached embeddings"):
        _probe(head="knn", cache=False)
    with pytest.raises(ConfigError, match=r"model.probe.match_scale: the backbone's native scale is unknown"):
        _probe(native_mpp=None, match_scale=True)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("weights", ["uniform", "distance"])
def test_knn_head_agrees_with_scikit_learn(metric: str, weights: str) -> None:
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(0)
    train, labels, test = rng.normal(size=(200, 16)), rng.integers(0, 3, 200), rng.normal(size=(50, 16))
    test[0] = train[7]  # an exact match: under distance weighting it takes every vote
    ref = KNeighborsClassifier(n_neighbors=7, metric=metric, weights=weights, algorithm="brute")
    ref.fit(train, labels)
    head = KNNHead(16, 3, KNNConfig(k=7, metric=metric, weights=weights))
    head.fit(torch.tensor(train, dtype=torch.float64), torch.tensor(labels))
    probs = F.softmax(head(torch.tensor(test)), 1).numpy()
    assert np.allclose(probs, ref.predict_proba(test), atol=1e-5)
    assert (probs.argmax(1) == ref.predict(test)).all()


def test_knn_memory_travels_in_the_state_dict() -> None:
    model = _probe(head="knn", knn={"k": 3})
    with pytest.raises(ConfigError, match="the kNN memory is empty"):
        model(torch.randn(1, 384))
    model.head.fit(torch.randn(10, 384), torch.arange(10) % 3)
    again = _probe(head="knn", knn={"k": 3})
    again.load_state_dict(model.state_dict())
    z = torch.randn(4, 384)
    assert torch.equal(again(z), model(z)) and len(again.head.bank) == 10


def test_a_linear_probe_learns_a_separable_task() -> None:
    """The head alone, on embeddings, with the probe protocol's optimiser: separable classes become perfect."""
    torch.manual_seed(0)
    model = _probe()
    y = torch.arange(300) % 3
    z = torch.randn(300, 384)
    z[torch.arange(300), y] += 6.0  # class c: a shift along axis c, invisible to a random head
    before = (model(z).argmax(1) == y).float().mean()
    opt = torch.optim.AdamW(model.head.parameters(), lr=3e-3)
    model.train()
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(z), y).backward()
        opt.step()
    assert before < 0.6 and (model.eval()(z).argmax(1) == y).float().mean() == 1.0


def test_tiles_cover_the_input_at_the_native_scale() -> None:
    assert tile_starts(400, 224) == [0, 176] and tile_starts(224, 224) == [0] and tile_starts(100, 224) == [0]
    model = _probe(match_scale=True)
    model.set_input_mpp(0.9)  # 32 px at 0.9 um/px -> 58 px at 0.5 um/px -> 2 x 2 tiles of 32
    x = torch.randn(2, 3, 32, 32)
    tiles = model.tiles(x)
    assert tiles.shape == (2, 4, 3, 32, 32)
    big = F.interpolate(x, size=(58, 58), mode="bicubic", align_corners=False)
    assert torch.allclose(tiles[:, 3], big[..., 26:, 26:])  # the last tile ends at the far corner
    with torch.no_grad():
        mean = torch.stack([embed(model.backbone, tiles[:, i], "cls+mean") for i in range(4)], 1).mean(1)
    assert torch.allclose(model.embed_images(x), mean, atol=1e-5)
    model.set_input_mpp(0.25)  # finer than native: shrunk to 16 px and padded with the mean colour (0)
    small = model.tiles(x)
    assert small.shape == (2, 1, 3, 32, 32) and small[..., 16:, :].abs().max() == 0
    raw = _probe(match_scale=False)
    raw.set_input_mpp(0.9)
    assert raw.zoom == 1.0  # without match_scale the input is embedded as it is
