from __future__ import annotations

import io

import pytest
import torch
from train_helpers import tiny_overrides

from t2i.train.config import load_config


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models run fastest on one thread, and several OpenMP threads on a shared 2-core machine can be
    # hundreds of times slower (spin-waiting barriers); restore the setting for other test packages
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_cfg(tmp_path):
    """A factory of tiny configs writing under tmp_path: ``tiny_cfg(**{"optim.grad_accum": 2})``."""

    def make(**extra):
        return load_config(None, tiny_overrides(tmp_path, **extra))

    return make


@pytest.fixture
def quiet():
    return io.StringIO()
