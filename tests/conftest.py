import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The tests run tiny ops, where a second intra-op thread only adds synchronisation cost
    # (and stalls badly when the cores are shared); results do not depend on it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
