import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny ops: one intra-op thread is much faster than two (and steadier on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
