"""The Objective: every term returned, total = weighted sum, ablations skip terms, betas ramp."""

from __future__ import annotations

import math

import pytest
import torch

from cmafnet.config import LossConfig, RegularizerConfig, config_from_dict
from cmafnet.losses import (
    Objective,
    attention_diversity,
    class_entropy,
    create_loss,
    gaussian_kl,
    gaussian_mutual_information,
    mutual_info_lower_bound,
    orthogonality,
    stage1_loss,
)
from cmafnet.models.output import ModelOutput

COUNTS = [716, 284]
B, D, HW, H = 16, 12, 3, 4


def _output(*, requires_grad: bool = False, seed: int = 0) -> ModelOutput:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).requires_grad_(requires_grad)

    n = HW * HW
    attn_logits = r(B, H, n, n)
    return ModelOutput(
        logits=r(B, 2),
        f_s=r(B, D, HW, HW),
        f_att=r(B, D, HW, HW),
        attn=attn_logits.softmax(-1),
        mu_s=r(B, n, D),
        logvar_s=r(B, n, D) * 0.1,
        mu_t=r(B, n, D),
        logvar_t=r(B, n, D) * 0.1,
        z_s=r(B, D),
        z_t=r(B, D),
        aux_logits={"spatial": r(B, 2), "contextual": r(B, 2)},
    )


def _objective(**reg: object) -> Objective:
    reg_cfg = RegularizerConfig(beta_schedule="fixed", **reg)
    return Objective(LossConfig(name="acbfl"), reg_cfg, COUNTS, num_heads=H)


def test_returns_every_term_and_total_is_the_weighted_sum() -> None:
    obj = _objective(beta1=0.01, beta2=0.005, diversity=0.02, entropy=0.03, orthogonality=0.04)
    out = _output()
    target = torch.randint(0, 2, (B,))
    total, terms = obj(out, target, epoch=2.0, beta_ramp=1.0)
    assert set(terms) == {
        "cls",
        "kl_s",
        "kl_t",
        "redundancy",
        "diversity",
        "attn_entropy",
        "orthogonality",
        "total",
        "beta1",
        "beta2",
    }
    # Each term recomputed independently.
    cls = create_loss("acbfl", class_counts=COUNTS)
    torch.testing.assert_close(terms["cls"], cls(out.logits, target, epoch=2.0))
    torch.testing.assert_close(terms["kl_s"], gaussian_kl(out.mu_s, out.logvar_s))
    torch.testing.assert_close(terms["redundancy"], gaussian_mutual_information(out.z_s, out.z_t))
    torch.testing.assert_close(terms["diversity"], attention_diversity(out.attn))
    torch.testing.assert_close(terms["orthogonality"], orthogonality(out.f_s, out.f_att))
    expected = (
        terms["cls"]
        + 0.01 * (terms["kl_s"] + terms["kl_t"])
        + 0.005 * terms["redundancy"]
        + 0.02 * terms["diversity"]
        + 0.03 * terms["attn_entropy"]
        + 0.04 * terms["orthogonality"]
    )
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(terms["total"], expected)
    assert terms["beta1"] == 0.01 and terms["beta2"] == 0.005
    assert all(not t.requires_grad for t in terms.values() if isinstance(t, torch.Tensor))


def test_gradients_reach_inputs_and_entropy_weights() -> None:
    obj = _objective()
    out = _output(requires_grad=True)
    total, _ = obj(out, torch.randint(0, 2, (B,)), epoch=0.0, beta_ramp=1.0)
    total.backward()
    assert obj.entropy_reg.head_logits.grad is not None
    assert list(obj.parameters()) == [obj.entropy_reg.head_logits]
    assert torch.isfinite(obj.entropy_reg.head_logits.grad).all()
    torch.testing.assert_close(obj.entropy_weights.sum(), torch.tensor(1.0))


def test_ablations_skip_terms_without_inputs_or_weight() -> None:
    out = _output()
    # CNN-only model: no attention, no contextual branch.
    out.attn = out.f_att = out.mu_t = out.logvar_t = out.z_t = None
    target = torch.randint(0, 2, (B,))
    total, terms = _objective()(out, target, epoch=1.0, beta_ramp=1.0)
    assert set(terms) == {"cls", "kl_s", "total", "beta1", "beta2"}
    # Zero weights skip the computation.
    obj = _objective(beta2=0.0, diversity=0.0, entropy=0.0, orthogonality=0.0)
    _, terms = obj(_output(), target, epoch=1.0, beta_ramp=1.0)
    assert not {"redundancy", "diversity", "attn_entropy", "orthogonality"} & set(terms)
    # use_regularizers=False: classification loss only.
    total, terms = _objective()(_output(), target, epoch=1.0, beta_ramp=1.0, use_regularizers=False)
    torch.testing.assert_close(total, terms["cls"])
    assert set(terms) == {"cls", "total", "beta1", "beta2"}
    # The Table 6 regulariser rows are valid configs.
    from cmafnet.experiments.paper_tables import IB, TABLES

    for row in (r for r in TABLES["table6"].rows if r.group == IB):
        cfg = config_from_dict({}, list(row.overrides))
        assert cfg.regularizers != RegularizerConfig()  # the row changes the objective
        Objective(LossConfig(), cfg.regularizers, COUNTS)


def test_betas_are_the_configured_weights_times_the_ramp() -> None:
    """beta_i = regularizers.beta_i * beta_ramp, a number or a 0-d tensor (a captured step); the terms are
    computed at every ramp value, 0 included, so a run logs the same terms at every step."""
    reg = RegularizerConfig(beta1=0.01, beta2=0.004, diversity=0.0, entropy=0.0, orthogonality=0.0)
    obj = Objective(LossConfig(), reg, COUNTS, num_heads=H)
    out, target = _output(), torch.randint(0, 2, (B,))
    cls, _ = obj(out, target, epoch=1.0, beta_ramp=0.0, use_regularizers=False)
    for ramp in (0.0, 0.5, torch.tensor(0.5), 1.0):
        total, terms = obj(out, target, epoch=1.0, beta_ramp=ramp)
        assert {"kl_s", "kl_t", "redundancy"} <= set(terms)
        assert float(terms["beta1"]) == pytest.approx(0.01 * float(ramp))
        assert float(terms["beta2"]) == pytest.approx(0.004 * float(ramp))
        kl = terms["kl_s"] + terms["kl_t"]
        torch.testing.assert_close(
            total, cls + 0.01 * float(ramp) * kl + 0.004 * float(ramp) * terms["redundancy"]
        )
        if ramp == 0.0:
            assert torch.equal(total, cls)  # the ramp's start adds exactly nothing


def test_objective_moves_buffers_and_validates_heads() -> None:
    obj = Objective(LossConfig(), RegularizerConfig(), COUNTS, num_heads=8)
    assert "loss.w_inv" in dict(obj.named_buffers())
    with pytest.raises(ValueError, match="num_heads"):
        obj(_output(), torch.randint(0, 2, (B,)), epoch=0.0, beta_ramp=1.0)  # attention has 4 heads
    with pytest.raises(ValueError, match="class_counts"):
        Objective(LossConfig(), RegularizerConfig(), [10, 0])


def test_stage1_loss_sums_branch_cross_entropies() -> None:
    out = _output()
    target = torch.randint(0, 2, (B,))
    total, terms = stage1_loss(out, target)
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(
        total, ce(out.aux_logits["spatial"], target) + ce(out.aux_logits["contextual"], target)
    )
    assert set(terms) == {"ce_spatial", "ce_contextual", "total"}
    out.aux_logits = {}
    with pytest.raises(ValueError, match="aux_logits"):
        stage1_loss(out, target)


def test_mutual_info_lower_bound() -> None:
    h = -(0.716 * math.log(0.716) + 0.284 * math.log(0.284))
    assert class_entropy([716, 284]) == pytest.approx(h)
    # A classifier that only predicts the prior has CE = H(Y): the bound is 0.
    assert mutual_info_lower_bound(h, [0.716, 0.284]) == pytest.approx(0.0, abs=1e-12)
    assert mutual_info_lower_bound(0.1, [0.5, 0.5]) == pytest.approx(math.log(2) - 0.1)


def test_compiled_regularizers_equal_eager_without_recompiling() -> None:
    """``train.compile`` compiles the regulariser terms: same values and gradients, and the
    changing schedule weights (floats outside the compiled function) never recompile it."""
    import torch._dynamo

    from cmafnet.config import load_config
    from cmafnet.losses import Objective
    from cmafnet.models import create_model

    cfg = load_config("smoke", [])
    torch.manual_seed(0)
    model = create_model(cfg.model, img_size=64).train()
    objective = Objective(cfg.loss, cfg.regularizers, [300, 100], num_heads=cfg.model.fusion.heads)
    x, y = torch.randn(6, 3, 64, 64), torch.randint(0, 2, (6,))

    def run() -> tuple[dict, list]:
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks
        total, terms = objective(model(x, return_aux=True), y, epoch=3.0, beta_ramp=1.0)
        total.backward()
        return terms, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    ref_terms, ref_grads = run()
    torch._dynamo.reset()
    objective.compile_regularizers(fullgraph=True)  # fullgraph: no graph break, no host sync
    got_terms, got_grads = run()
    assert got_terms.keys() == ref_terms.keys()
    for k in ref_terms:
        torch.testing.assert_close(
            torch.as_tensor(got_terms[k]), torch.as_tensor(ref_terms[k]), rtol=1e-4, atol=1e-5
        )
    for a, b in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    # other weights (the ramp's start among them), other epoch: the same compiled graph
    objective(model(x, return_aux=True), y, epoch=5.5, beta_ramp=0.0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
    objective.compile_regularizers(False)
