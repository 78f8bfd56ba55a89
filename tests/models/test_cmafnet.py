"""CMAF-Net: every Table 6 / 7 row (from the experiment definitions) as config, the CMAF block maths, weights."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from cmafnet.config import FusionConfig, ModelConfig, TauInit, load_config
from cmafnet.errors import ConfigError
from cmafnet.experiments.paper_tables import expand
from cmafnet.losses.objective import Objective
from cmafnet.models import ModelOutput, create_model
from cmafnet.models.cmafnet import CMAFNet
from cmafnet.models.fusion import FUSIONS, TAU_MIN, CMAFBlock, init_log_tau
from cmafnet.run import save_weights

SIZE = 64
BASE = {
    "img_size": SIZE,
    "contextual": {"variant": "xxs", "num_landmarks": 2},
    "fusion": {"dim": 32, "heads": 4},
    "head": {"hidden": 16, "dropout": 0.1},
}


def _cfg(**over: dict) -> ModelConfig:
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    for key, val in over.items():
        if isinstance(val, dict):
            data[key] = {**data.get(key, {}), **val}
        else:
            data[key] = val
    return ModelConfig.model_validate(data)


# The small CMAF-Net of BASE as overrides of the shipped smoke config (rows' overrides follow).
TINY = [
    f"model.img_size={SIZE}",
    "model.contextual.variant=xxs",
    "model.contextual.num_landmarks=2",
    "model.fusion.dim=32",
    "model.fusion.heads=4",
    "model.head.hidden=16",
    "model.head.dropout=0.1",
]
# Every row of Tables 6 (ablations) and 7 (temperature initialisations), read from the experiment
# definitions, so a new row is tested here without editing this file ...
PAPER_ROWS = {
    s.row: list(s.overrides) for t in ("table6", "table7") for s in expand(t, seeds=1, scale="smoke")
}
# ... plus the model switches no paper row uses.
SWITCHES = {
    "nystrom": ["model.contextual.attention=nystrom"],
    "patch4_no_pos_plain_resnet": [
        "model.contextual.patch_size=4",
        "model.contextual.scale_aware_pos=false",
        "model.contextual.learned_pos=false",
        "model.spatial.skip_merge=false",
        "model.spatial.spatial_gate=false",
    ],
    "no_bottleneck_cosine_head": [
        "model.bottleneck=false",
        "model.head.normalized=true",
        "model.head.hidden=0",
    ],
    "grad_checkpointing_drop_path": ["model.grad_checkpointing=true", "model.drop_path=0.1"],
}
VARIANTS = {**PAPER_ROWS, **SWITCHES}
# Objective term -> the regulariser weight that switches it off when 0.
TERM_WEIGHTS = {"redundancy": "beta2", "diversity": "diversity", "attn_entropy": "entropy",
                "orthogonality": "orthogonality", "kl_s": "beta1", "kl_t": "beta1"}  # fmt: skip


def test_paper_rows_are_read_from_the_tables() -> None:
    assert len(PAPER_ROWS) == 19 + 7 - 1  # Table 7's LogNormal(0, 0.1) row is Table 6's full model
    assert {"cmafnet", "cmafnet__no_contextual", "cmafnet__no_gate", "cmafnet__tau_uniform"} <= set(
        PAPER_ROWS
    )


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_forward_backward(name: str) -> None:
    """Each row's model and objective, one step: shapes, the row's terms, every parameter a gradient."""
    torch.manual_seed(0)
    full = load_config("smoke", [*TINY, *VARIANTS[name]])
    cfg = full.model
    model = create_model(cfg)
    model.train()
    x, y = torch.randn(2, 3, SIZE, SIZE), torch.tensor([0, 1])
    out = model(x, return_aux=True)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (2, 2)
    assert out.pre_logits.shape == (2, 32)
    assert out.f_fused.shape == (2, 32, 2, 2)
    assert set(out.aux_logits) == {
        b for b, on in (("spatial", cfg.spatial.enabled), ("contextual", cfg.contextual.enabled)) if on
    }
    objective = Objective(
        full.loss, full.regularizers, [30, 10], num_heads=cfg.fusion.heads, total_epochs=3.0
    )
    total, terms = objective(out, y, epoch=1.0, beta_ramp=1.0)  # past the ramp: full betas
    assert torch.isfinite(total)
    for term, weight in TERM_WEIGHTS.items():  # a regulariser the row weights 0 is not computed
        if getattr(full.regularizers, weight) == 0:
            assert term not in terms, term
    # The aux heads are trained by stage 1's cross-entropy, not by the objective.
    loss = total + sum(v.square().sum() for v in out.aux_logits.values())
    loss.backward()
    frozen = model.frozen_parameter_names()
    for pname, p in model.named_parameters():
        if pname in frozen:
            assert p.grad is None, pname
            continue
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), pname
    assert torch.isfinite(out.logits).all()
    # Plain forward gives logits of the same shape; a cosine head is bounded by 1.
    model.eval()
    with torch.no_grad():
        logits = model(x * 10)
    assert logits.shape == (2, 2)
    if cfg.head.normalized:
        assert logits.abs().max() <= 1.0 + 1e-6


@pytest.fixture(scope="module")
def eval_model() -> CMAFNet:
    torch.manual_seed(0)
    return create_model(_cfg()).eval()


def test_aux_output_fields(eval_model: CMAFNet) -> None:
    model = eval_model
    with torch.no_grad():
        out = model(torch.randn(3, 3, SIZE, SIZE), return_aux=True)
    n = 4  # 2 x 2 grid at 64 px
    assert out.attn.shape == (3, 4, n, n)
    torch.testing.assert_close(out.attn.sum(-1), torch.ones(3, 4, n))
    assert out.tau.shape == (4,) and (out.tau > 0).all()
    assert out.gate.shape == (3, 32, 2, 2) and ((out.gate > 0) & (out.gate < 1)).all()
    for f in ("f_s", "f_t", "f_att"):
        assert getattr(out, f).shape == (3, 32, 2, 2)
    for f in ("mu_s", "logvar_s", "mu_t", "logvar_t"):
        assert getattr(out, f).shape == (3, n, 32)
    assert out.z_s.shape == out.z_t.shape == (3, 32)
    # In eval the bottleneck passes its mean: f_s is mu reshaped to the grid.
    torch.testing.assert_close(out.f_s.flatten(2).transpose(1, 2), out.mu_s)


def test_plain_forward_matches_aux_and_skips_aux_work(eval_model: CMAFNet) -> None:
    model = eval_model
    called: list[str] = []
    names = ("aux_heads.spatial", "aux_heads.contextual", "bottleneck_s.logvar", "bottleneck_t.logvar")
    hooks = [model.get_submodule(n).register_forward_hook(lambda *_, n=n: called.append(n)) for n in names]
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        plain = model(x)
        assert called == []  # no aux heads, no log-variances on the plain inference path
        full = model(x, return_aux=True)
    for h in hooks:
        h.remove()
    assert sorted(called) == sorted(names)  # the hooks work: the aux path does call them
    # SDPA with 1/tau folded into q == the explicit softmax(QK^T / (sqrt(d_h) tau)) path.
    torch.testing.assert_close(plain, full.logits, rtol=1e-4, atol=1e-5)


def test_cmaf_block_matches_eq13() -> None:
    torch.manual_seed(0)
    d, heads = 16, 4
    blk = CMAFBlock(FusionConfig(dim=d, heads=heads, tau_init=TauInit(kind="uniform", a=0.3, b=3.0))).eval()
    f_s, f_t = torch.randn(2, d, 3, 3), torch.randn(2, d, 2, 4)
    fused, aux = blk(f_s, f_t, return_aux=True)
    # Independent reference from the block's weights.
    ts = blk.norm_q(f_s.flatten(2).transpose(1, 2))
    tt = blk.norm_kv(f_t.flatten(2).transpose(1, 2))
    q = blk.q(ts).view(2, 9, heads, 4).transpose(1, 2)
    k, v = blk.kv(tt).view(2, 8, 2, heads, 4).unbind(2)
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    tau = torch.exp(blk.log_tau).view(1, heads, 1, 1)
    a = torch.softmax(q @ k.transpose(-1, -2) / (math.sqrt(4) * tau), dim=-1)
    att = blk.proj((a @ v).transpose(1, 2).reshape(2, 9, d)).transpose(1, 2).reshape(2, d, 3, 3)
    g = torch.sigmoid(blk.gate(torch.cat((att, f_s), 1)))
    torch.testing.assert_close(aux["attn"], a)
    torch.testing.assert_close(fused, g * att + (1 - g) * f_s)
    torch.testing.assert_close(blk(f_s, f_t)[0], fused, rtol=1e-4, atol=1e-5)
    # Larger temperatures flatten the attention (higher entropy).
    with torch.no_grad():
        blk.log_tau.fill_(3.0)
    a_hot = blk(f_s, f_t, return_aux=True)[1]["attn"]
    ent = lambda p: -(p * p.clamp_min(1e-12).log()).sum(-1).mean()  # noqa: E731
    assert ent(a_hot) > ent(a)


def test_no_gate_is_residual_sum() -> None:
    torch.manual_seed(0)
    blk = CMAFBlock(FusionConfig(dim=8, heads=2, gate=False)).eval()
    f_s, f_t = torch.randn(1, 8, 2, 2), torch.randn(1, 8, 2, 2)
    fused, aux = blk(f_s, f_t, return_aux=True)
    assert "gate" not in aux
    torch.testing.assert_close(fused, aux["f_att"] + f_s)


@pytest.mark.parametrize(
    ("kind", "a", "b"),
    [("lognormal", 0.0, 0.1), ("lognormal", 0.0, 0.5), ("lognormal", 0.0, 1.0), ("normal", 1.0, 0.1)],
)
def test_tau_init_distribution(kind: str, a: float, b: float) -> None:
    g = torch.Generator().manual_seed(0)
    log_tau = init_log_tau(TauInit(kind=kind, a=a, b=b), 20000, generator=g)
    tau = log_tau.exp()
    assert (tau > 0).all()
    if kind == "lognormal":  # log tau ~ N(a, b)
        assert abs(log_tau.mean().item() - a) < 0.03 * max(b, 0.1)
        assert abs(log_tau.std().item() - b) < 0.03 * b
    else:  # tau ~ N(a, b) (clamping is inactive this far from zero)
        assert abs(tau.mean().item() - a) < 0.005
        assert abs(tau.std().item() - b) < 0.005


def test_tau_init_fixed_uniform_and_clamp() -> None:
    torch.testing.assert_close(init_log_tau(TauInit(kind="fixed", a=0.5), 8).exp(), torch.full((8,), 0.5))
    tau = init_log_tau(TauInit(kind="uniform", a=0.5, b=1.5), 20000, torch.Generator().manual_seed(1)).exp()
    assert tau.min() >= 0.5 and tau.max() < 1.5 and abs(tau.mean().item() - 1.0) < 0.01
    # A wide normal draws negatives: they are clamped to TAU_MIN, never <= 0.
    tau = init_log_tau(TauInit(kind="normal", a=0.1, b=1.0), 1000, torch.Generator().manual_seed(2)).exp()
    assert tau.min().item() == pytest.approx(TAU_MIN) and (tau > 0).all()


def test_tau_stays_positive_and_frozen_when_not_learned() -> None:
    cfg = _cfg(fusion={"learn_temperature": False, "tau_init": {"kind": "fixed", "a": 1.0}})
    model = create_model(cfg)
    assert model.frozen_parameter_names() == {"fusion.log_tau"}
    groups = model.param_groups_by_role()
    assert all(p is not model.fusion.log_tau for p in groups["fusion"])
    # Stage freezing by the trainer does not change what counts as config-frozen.
    model.spatial.requires_grad_(False)
    assert model.frozen_parameter_names() == {"fusion.log_tau"}
    assert len(model.param_groups_by_role()["spatial"]) == len(list(model.spatial.parameters()))
    torch.testing.assert_close(model.fusion.tau, torch.ones(4))
    learned = create_model(_cfg())
    with torch.no_grad():
        learned.fusion.log_tau.fill_(-50.0)  # any real log tau maps to a positive tau
    assert (learned.fusion.tau > 0).all()


def test_param_groups_partition_parameters(eval_model: CMAFNet) -> None:
    model = eval_model
    groups = model.param_groups_by_role()
    assert set(groups) == {"spatial", "contextual", "fusion", "head", "aux_heads"}
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert {id(p) for p in model.spatial.parameters()} == {id(p) for p in groups["spatial"]}
    assert {id(p) for p in model.aux_heads.parameters()} == {id(p) for p in groups["aux_heads"]}
    assert any(p is model.proj_s[0].weight for p in groups["fusion"])


def test_contract_attributes_and_reset_classifier() -> None:
    model = create_model(_cfg())
    assert model.img_size == SIZE and model.num_classes == 2
    model.reset_classifier(5)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, SIZE, SIZE), return_aux=True)
    assert out.logits.shape == (1, 5) and out.aux_logits["spatial"].shape == (1, 5)
    feats = model.forward_features(torch.randn(1, 3, SIZE, SIZE))
    assert model.forward_head(feats, pre_logits=True).shape == (1, 32)


def test_fusion_registry() -> None:
    assert {"cmaf", "concat"} <= set(FUSIONS.names())
    with pytest.raises(ConfigError, match="Did you mean 'concat'"):
        FUSIONS.get("concatt")
    with pytest.raises(ConfigError, match="unknown fusion"):
        create_model(_cfg(fusion={"kind": "sum"}))
    assert isinstance(FUSIONS.get("cmaf")(FusionConfig(dim=16, heads=2)), CMAFBlock)


def test_whole_model_weights_roundtrip(tmp_path) -> None:
    torch.manual_seed(0)
    a = create_model(_cfg()).eval()
    save_weights(a, tmp_path / "m.safetensors")
    b = create_model(_cfg(weights=str(tmp_path / "m.safetensors"))).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))
    with pytest.raises(ConfigError, match=r"model\.weights"):  # a file for another architecture
        create_model(_cfg(fusion={"heads": 2, "dim": 16}, weights=str(tmp_path / "m.safetensors")))


def test_spatial_branch_loads_timm_resnet18(tmp_path) -> None:
    torch.manual_seed(0)
    ref = timm.create_model("resnet18", pretrained=False).eval()
    torch.save(ref.state_dict(), tmp_path / "resnet18.pth")
    model: CMAFNet = create_model(_cfg(spatial={"weights": str(tmp_path / "resnet18.pth")})).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model.spatial.body(x)[-1], ref.forward_features(x))
    bad = {k: v for k, v in ref.state_dict().items() if not k.startswith("layer4")}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match=r"spatial\.weights"):
        create_model(_cfg(spatial={"weights": str(tmp_path / "bad.pth")}))


def test_branches_load_from_a_saved_cmafnet(tmp_path) -> None:
    """Branch weight files may be a whole saved CMAF-Net: its spatial.body.* / contextual.* keys are used."""
    torch.manual_seed(0)
    a = create_model(_cfg())
    save_weights(a, tmp_path / "run.safetensors")
    torch.manual_seed(1)
    path = str(tmp_path / "run.safetensors")
    b = create_model(_cfg(spatial={"weights": path}, contextual={"weights": path}))
    torch.testing.assert_close(b.spatial.body.conv1.weight, a.spatial.body.conv1.weight)
    torch.testing.assert_close(b.contextual.stem.conv.weight, a.contextual.stem.conv.weight)
    torch.testing.assert_close(b.contextual.stages[2][1].pos_embed, a.contextual.stages[2][1].pos_embed)
    assert not torch.equal(b.head.fc.weight, a.head.fc.weight)  # only the branches were loaded


def test_grad_checkpointing_same_gradients_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU twin of the GPU test (paper model at 64 px): checkpointing on == off, in both branches.

    Caught the spatial branch checkpointing the ResNet stem's ``ReLU(inplace=True)`` (timm 1.0.29's
    FeatureListNet), whose in-place write invalidated the tensor saved for recompute.
    """
    import cmafnet.models.mobilevit as mobilevit_mod
    import cmafnet.models.spatial as branches_mod
    from cmafnet.config import load_config

    calls = {"spatial": 0, "contextual": 0}

    def counting(key: str, real):  # wraps torch's checkpoint, counting calls per branch
        def wrapped(*args, **kw):
            calls[key] += 1
            return real(*args, **kw)

        return wrapped

    monkeypatch.setattr(branches_mod, "checkpoint", counting("spatial", branches_mod.checkpoint))
    monkeypatch.setattr(mobilevit_mod, "checkpoint", counting("contextual", mobilevit_mod.checkpoint))

    torch.manual_seed(0)
    cfg = load_config("paper", ["model.bottleneck=false", "model.head.dropout=0", "model.img_size=64"])
    model = create_model(cfg.model).eval()  # eval: BN statistics fixed, no sampling
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert calls == {"spatial": 0, "contextual": 0}
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    for m in (model.spatial, model.contextual):
        m.train()  # checkpointing acts in training mode only
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.eval()
    model(x).sum().backward()
    # Only the residual stages are recomputed, never the stem (its in-place ReLU).
    assert calls == {"spatial": 4, "contextual": len(model.contextual.stages)}
    assert set(ref) == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, g in ref.items():
        torch.testing.assert_close(model.get_parameter(n).grad, g, rtol=1e-3, atol=1e-4, msg=n)
