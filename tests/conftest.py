import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one thread per test process: oversubscribed OpenMP threads spin-wait and slow tiny models tenfold or more
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    # every test starts from the same global RNG state, and never depends on test order
    torch.manual_seed(0)
    yield
