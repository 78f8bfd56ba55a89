"""The committed test assets are what their PROVENANCE.md says: byte-for-byte copies, listed, counted."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from pathlib import Path

IDC = Path(__file__).parent / "assets" / "idc"


def test_idc_subset_matches_its_manifest() -> None:
    rows = list(csv.DictReader((IDC / "MANIFEST.csv").open()))
    files = sorted(
        p.relative_to(IDC).as_posix() for p in (IDC / "IDC_regular_ps50_idx5").rglob("*") if p.is_file()
    )
    assert files == sorted(r["path"] for r in rows)  # every file listed, nothing else in the folder
    for r in rows:
        assert hashlib.sha256((IDC / r["path"]).read_bytes()).hexdigest() == r["sha256"], r["path"]
        patient, label, name = r["path"].split("/")[1:]
        assert (patient, label) == (r["patient_id"], r["label"]) and name.endswith(f"_class{label}.png")
        assert (
            r["source_path"].endswith(f"/{label}/{name}") and r["source_repo"] == "iotJumpway/Intel-Examples"
        )
    counts = Counter((r["patient_id"], r["label"]) for r in rows)
    assert counts == {("8863", "0"): 100, ("8863", "1"): 60, ("8865", "0"): 100, ("8865", "1"): 55,
                      ("8867", "0"): 100, ("8867", "1"): 60}  # fmt: skip
    assert sum((IDC / r["path"]).stat().st_size for r in rows) < 3_000_000
    assert "CC0" in (IDC / "PROVENANCE.md").read_text()  # the licence that allows committing them
