"""Session-scoped stores shared by the data tests (each ingest runs once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmafnet.data.ingest import ingest
from cmafnet.data.store import PatchStore
from cmafnet.data.synthetic import write_idc_like


@pytest.fixture(scope="session")
def idc_store(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> PatchStore:
    """The shared real IDC sample (5,697 patches) ingested with two worker processes."""
    out = tmp_path_factory.mktemp("idc_store")
    ingest("idc", sample_data / "idc", out, workers=2, progress=False)
    return PatchStore.open(out)


@pytest.fixture(scope="session")
def synthetic_idc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_idc_like(
        tmp_path_factory.mktemp("syn_idc"), n_patients=20, patches_per_patient=40, minority_frac=0.3
    )


@pytest.fixture(scope="session")
def synthetic_store(synthetic_idc_root: Path, tmp_path_factory: pytest.TempPathFactory) -> PatchStore:
    out = tmp_path_factory.mktemp("syn_store")
    ingest("idc", synthetic_idc_root, out, workers=1, progress=False)
    return PatchStore.open(out)
