import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Training tests run tiny models: one intra-op thread is faster than two on shared cores."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
