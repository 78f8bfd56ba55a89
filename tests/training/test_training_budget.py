"""Compute budgets: a run's steps derived from training MACs or from another run's recorded MACs, written
into its own config so the matched run reruns from its folder alone."""

from __future__ import annotations

import json

import pytest
import yaml

from cmafnet.config import load_config
from cmafnet.errors import ConfigError
from cmafnet.training.budget import epoch_steps, resolve_budget, stage_epochs, stage_steps


def test_budget_config_takes_exactly_one_of_macs_or_match() -> None:
    assert load_config("smoke", ["train.budget.macs=1e12"]).train.budget.macs == 1e12
    for bad in (["train.budget.macs=1e12", "train.budget.match=x"], ["train.budget.macs=-1"]):
        with pytest.raises(ConfigError, match="budget"):
            load_config("smoke", bad)


def test_macs_budget_keeps_the_stage_proportions_and_lands_within_one_step() -> None:
    cfg = load_config("smoke", ["train.stages.1.epochs=2", "train.budget.macs=5e11"])  # epochs 1/2/1
    macs_per_image, spe = 1_000_000, 4
    per_step = macs_per_image * 32 * 2 * 3  # batch 32, SAM on: two passes
    resolved, rec = resolve_budget(cfg, macs_per_image, spe)
    steps = [s.steps for s in resolved.train.stages]
    assert abs(sum(steps) * per_step - 5e11) <= per_step / 2
    assert steps[1] == pytest.approx(2 * steps[0], abs=1) and steps[2] == pytest.approx(steps[0], abs=1)
    assert (
        resolved.train.budget is None
        and rec["kind"] == "macs"
        and rec["planned_macs"] == sum(steps) * per_step
    )
    for s in resolved.train.stages:  # epochs hold the steps; only the last epoch is cut short
        assert stage_steps(s, spe) == s.steps and stage_epochs(s, spe) == s.epochs
        assert sum(epoch_steps(s, e, spe) for e in range(s.epochs)) == s.steps
    assert resolve_budget(load_config("smoke"), macs_per_image, spe) == (load_config("smoke"), None)
    with pytest.raises(ConfigError, match="at least one step"):
        resolve_budget(load_config("smoke", ["train.budget.macs=1e6"]), macs_per_image, spe)


@pytest.mark.slow
def test_match_reproduces_the_reference_runs_macs(store_and_split, tmp_path) -> None:
    """A ResNet-18 given a CMAF-Net run's compute spends it (within one of its steps), records where the
    budget came from, and its own config.yaml reruns the same number of steps."""
    from cmafnet.training import fit

    store, split = store_and_split
    fast = ["train.batch_size=16", "train.eval_batch_size=32", "train.max_steps_per_epoch=2"]
    ref = fit(load_config("smoke", fast), store, split, tmp_path / "cmaf", progress=False, device="cpu")
    target = ref["cost"]["macs"]
    base = ["model.name=resnet18", "train.batch_size=16", "train.eval_batch_size=32", "model.img_size=64"]
    cfg = load_config("baseline_smoke", [*base, f"train.budget.match={tmp_path / 'cmaf'}"])
    got = fit(cfg, store, split, tmp_path / "r18", progress=False, device="cpu")
    meta = json.loads((tmp_path / "r18" / "run.json").read_text())
    per_step = meta["budget"]["macs_per_step"]
    assert got["status"] == "finished" and abs(got["cost"]["macs"] - target) <= per_step
    assert meta["budget"]["kind"] == "match" and meta["budget"]["target_macs"] == target
    stored = yaml.safe_load((tmp_path / "r18" / "config.yaml").read_text())
    assert stored["train"]["budget"] is None and stored["train"]["stages"][0]["steps"] == got["global_step"]
    again = fit(load_config(tmp_path / "r18" / "config.yaml"), store, split, tmp_path / "again", progress=False,
                device="cpu")  # fmt: skip
    assert again["global_step"] == got["global_step"] and again["cost"]["macs"] == got["cost"]["macs"]
