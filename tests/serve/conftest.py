"""Fixtures of the server tests: a tiny SD3 model folder shared by the session."""

from __future__ import annotations

import pytest
from model_folders import tiny_sd3_folder


@pytest.fixture(scope="session")
def sd3_folder(tmp_path_factory):
    return str(tiny_sd3_folder(tmp_path_factory.mktemp("serve_sd3")))
