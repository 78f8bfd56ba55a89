"""The failure corpus: every input is generated here (no committed binaries), every fixture is tiny.

A run is a random-init ResNet-18 at 32 px with the smoke config (no stain step: Macenko dominates
CPU time); the store is 48 synthetic 50x50 IDC-like patches of 6 virtual patients.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from _corpus import make_run

from cmafnet.cli import main
from cmafnet.data.ingest import ingest
from cmafnet.data.splits import save_split, split_store
from cmafnet.data.store import PatchStore
from cmafnet.data.synthetic import write_idc_like


@pytest.fixture
def cli(capsys: pytest.CaptureFixture) -> Callable[..., tuple[int, str, str]]:
    """Run ``cmafnet ARGS``; return (exit code, stdout, stderr). argparse's exits are caught."""

    def run(*argv: object) -> tuple[int, str, str]:
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse usage errors
            rc = int(exc.code or 0)
        out, err = capsys.readouterr()
        return rc, out, err

    return run


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("fail_run") / "run")


@pytest.fixture(scope="session")
def idc_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_idc_like(
        tmp_path_factory.mktemp("fail_src"), n_patients=6, patches_per_patient=8, minority_frac=0.3
    )


@pytest.fixture(scope="session")
def store_dir(idc_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fail_store") / "store"
    ingest("idc", idc_src, out, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def split_file(store_dir: Path) -> Path:
    path = store_dir.parent / "split.json"
    save_split(split_store(PatchStore.open(store_dir), ratios=(0.5, 0.25, 0.25), seed=0), path)
    return path


@pytest.fixture
def store_copy(store_dir: Path, tmp_path: Path) -> Path:
    """A copy of the store to damage."""
    return Path(shutil.copytree(store_dir, tmp_path / "store"))
