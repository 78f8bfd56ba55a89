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


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """The shared real samples (CMAFNET_SAMPLE_DATA); tests that need them skip without it."""
    root = os.environ.get("CMAFNET_SAMPLE_DATA")
    if not root:
        pytest.skip("CMAFNET_SAMPLE_DATA is not set (real-sample tests need ../shared/data)")
    path = Path(root).resolve()  # CI passes a relative path; tests may change folders or write lists
    if not path.is_dir():
        pytest.fail(f"CMAFNET_SAMPLE_DATA={root} is not a folder")
    return path


@pytest.fixture(scope="session")
def idc_sample() -> tuple[Path, str]:
    """IDC patches in the Kaggle layout and which set they are: ``"shared"`` or ``"assets"``.

    The shared sample (CMAFNET_SAMPLE_DATA, 11 patients) when it is set; otherwise the subset of it
    committed under ``tests/assets/idc`` (3 patients, see its PROVENANCE.md), so real-data tests
    run on a bare clone.
    """
    root = os.environ.get("CMAFNET_SAMPLE_DATA")
    if root:
        path = Path(root).resolve() / "idc" / "IDC_regular_ps50_idx5"
        if not path.is_dir():
            pytest.fail(f"CMAFNET_SAMPLE_DATA={root} has no idc/IDC_regular_ps50_idx5 folder")
        return path, "shared"
    return ASSETS / "idc" / "IDC_regular_ps50_idx5", "assets"
