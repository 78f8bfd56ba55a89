"""experiment table1 / table3 --foundation: probe rows (at the store's scale and resampled to the model's), their
configs, no compute matching, and Table 1 end to end with the rows' training and extraction MACs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cmafnet.cli import main
from cmafnet.config import load_config
from cmafnet.errors import ConfigError
from cmafnet.experiments.paper_tables import PROBE_GROUP, expand, get_table


def test_probe_rows_train_with_the_probe_config_at_the_models_input() -> None:
    specs = [s for s in expand("table1", 2, "paper", foundation=("uni2-h",)) if s.row.startswith("probe-")]
    assert [s.run_id for s in specs] == ["probe-uni2-h/seed0", "probe-uni2-h/seed1", "probe-uni2-h__scaled/seed0",
                                         "probe-uni2-h__scaled/seed1"]  # fmt: skip
    raw, scaled = (
        load_config(specs[0].base, list(specs[0].overrides)),
        load_config(specs[2].base, list(specs[2].overrides)),
    )
    assert specs[0].base == "probe_paper" and raw.model.name == "probe" and raw.model.img_size == 224
    assert (
        raw.model.probe.foundation == "uni2-h"
        and not raw.model.probe.match_scale
        and scaled.model.probe.match_scale
    )
    assert (
        raw.train.batch_size == 256 and raw.train.stages[0].lr == 3e-4 and raw.train.stages[0].steps == 12500
    )
    table = get_table("table1", ("uni2-h",))
    assert [r.group for r in table.rows[-2:]] == [PROBE_GROUP] * 2 and table.rows[:-2] == get_table(
        "table1"
    ).rows
    # Table 3 evaluates the same (IDC-trained) runs zero-shot
    assert {s.run_id for s in expand("table3", 2, "paper", foundation=("uni2-h",))} >= {
        s.run_id for s in specs
    }


def test_probes_are_not_compute_matched_and_other_tables_refuse_them() -> None:
    specs = expand("table1", 1, "smoke", match_compute=True, foundation=("phikon",))
    assert not [s for s in specs if s.row.startswith("probe-") and s.match is not None]
    assert {s.row for s in specs} >= {"probe-phikon", "probe-phikon__scaled", "resnet50__cmafnet_compute"}
    with pytest.raises(ConfigError, match="--foundation: probe rows go into table1 and table3, not table2"):
        expand("table2", 1, foundation=("phikon",))
    with pytest.raises(ConfigError, match="Did you mean 'phikon'"):
        expand("table1", 1, foundation=("phikonn",))


@pytest.mark.slow
def test_table1_with_probe_rows_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Kaiko ViT-S/16's architecture with random weights (offline), at 64 px, both probe rows of one seed."""
    from cmafnet.data.ingest import ingest
    from cmafnet.data.synthetic import write_idc_like

    write_idc_like(tmp_path / "idc", n_patients=8, patches_per_patient=12, minority_frac=0.3, seed=0)
    ingest("idc", tmp_path / "idc", tmp_path / "store", workers=1, progress=False)
    sets = ["model.probe.backbone=random", "model.img_size=64", "train.batch_size=8", "train.stages.0.epochs=1",
            "model.probe.native_mpp=2.0", f"model.probe.cache_dir={tmp_path / 'cache'}", "eval.bootstrap=0"]  # fmt: skip
    out = tmp_path / "exp"
    args = ["experiment", "table1", "--store", str(tmp_path / "store"), "--scale", "smoke", "--seeds", "1",
            "--out", str(out), "--device", "cpu", "--foundation", "kaiko-vits16", "--only", "probe-*",
            *[a for s in sets for a in ("--set", s)]]  # fmt: skip
    assert main(args) == 0
    assert "2 trained" in capsys.readouterr().out
    cells = json.loads((out / "table1" / "table.json").read_text())["cells"]
    probe = {c["column"]: c for c in cells if c["row"] == "Kaiko ViT-S/16 (linear probe)"}
    scaled = {c["column"]: c for c in cells if c["row"] == "Kaiko ViT-S/16 (linear probe, at 0.5 µm/px)"}
    assert probe["balanced_accuracy"]["n"] == 1 == scaled["balanced_accuracy"]["n"]
    assert 0 < probe["extraction_macs"]["ours_mean"] < probe["train_macs"]["ours_mean"]
    # resampled to its scale, the backbone sees more tiles per image: more extraction MACs
    assert scaled["extraction_macs"]["ours_mean"] > probe["extraction_macs"]["ours_mean"]
    cmaf = next(c for c in cells if c["row"] == "CMAF-Net (Ours)" and c["column"] == "train_macs")
    assert cmaf["n"] == 0  # not trained here ('…'), but its column is there to compare against
    md = (out / "table1" / "table.md").read_text()
    assert "of which extraction" in md and "backbone's pretraining is not counted" in md
