import os
from pathlib import Path

import pytest
import torch

# No test reaches the network: pretrained names resolve from a Hugging Face cache only (tests that
# need one build it in a temporary folder). Set before anything imports huggingface_hub, which reads
# the variable once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ASSETS = Path(__file__).parent / "assets"

# One thread per test process: CI runs two xdist workers on two cores, and oversubscribed OpenMP
# threads were measured 10-50x slower on this kind of machine.
torch.set_num_threads(1)


def _shared_sample() -> tuple[Path | None, str]:
    """The shared sample folder (CMAFNET_SAMPLE_DATA) if it is there, else None and why not.

    The README's test command and .ci/run set the variable to ``../shared/data``; on a clone
    without that sibling folder the real-sample tests skip (and the IDC ones use the committed
    subset) rather than fail.
    """
    root = os.environ.get("CMAFNET_SAMPLE_DATA")
    if not root:
        return None, "CMAFNET_SAMPLE_DATA is not set (real-sample tests need ../shared/data)"
    path = Path(root).resolve()  # CI passes a relative path; tests may change folders or write lists
    if not path.is_dir():
        return None, f"CMAFNET_SAMPLE_DATA={root}: no such folder ({path})"
    return path, ""


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """The shared real samples (CMAFNET_SAMPLE_DATA); tests that need them skip without it."""
    path, why = _shared_sample()
    if path is None:
        pytest.skip(why)
    return path


@pytest.fixture(scope="session")
def idc_sample() -> tuple[Path, str]:
    """IDC patches in the Kaggle layout and which set they are: ``"shared"`` or ``"assets"``.

    The shared sample (CMAFNET_SAMPLE_DATA, 11 patients) when it is there; otherwise the subset of
    it committed under ``tests/assets/idc`` (3 patients, see its PROVENANCE.md), so real-data
    tests run on a bare clone.
    """
    path, _ = _shared_sample()
    if path is None:
        return ASSETS / "idc" / "IDC_regular_ps50_idx5", "assets"
    idc = path / "idc" / "IDC_regular_ps50_idx5"
    if not idc.is_dir():
        pytest.fail(f"CMAFNET_SAMPLE_DATA={path} has no idc/IDC_regular_ps50_idx5 folder")
    return idc, "shared"
