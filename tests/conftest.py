import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    # every test starts from the same global RNG state, and never depends on test order
    torch.manual_seed(0)
    yield
