import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Training tests run tiny models: one intra-op thread is faster than two on shared cores."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="session")
def store_and_split(tmp_path_factory):
    """A synthetic IDC-like store (6 patients x 16 patches) and its patient split, for real fit() runs."""
    from cmafnet.data.ingest import ingest
    from cmafnet.data.splits import save_split, split_store
    from cmafnet.data.store import PatchStore
    from cmafnet.data.synthetic import write_idc_like

    root = tmp_path_factory.mktemp("train_data")
    write_idc_like(root / "raw", n_patients=6, patches_per_patient=16, minority_frac=0.3, seed=0)
    ingest("idc", root / "raw", root / "store", workers=1, progress=False)
    store = PatchStore.open(root / "store")
    save_split(split_store(store, ratios=(0.6, 0.2, 0.2), seed=0), root / "split.json")
    return root / "store", root / "split.json"
