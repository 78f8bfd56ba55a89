import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """The shared real samples (CMAFNET_SAMPLE_DATA); tests that need them skip without it."""
    root = os.environ.get("CMAFNET_SAMPLE_DATA")
    if not root:
        pytest.skip("CMAFNET_SAMPLE_DATA is not set (real-sample tests need ../shared/data)")
    path = Path(root)
    if not path.is_dir():
        pytest.fail(f"CMAFNET_SAMPLE_DATA={root} is not a folder")
    return path
