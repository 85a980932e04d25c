"""Shared fixtures: a tiny random Llama saved to disk, small data folders, the real data (helpers: helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import TINY_CORPUS, write_data


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from lorascope.models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", corpus=TINY_CORPUS, vocab_size=400)


@pytest.fixture(scope="session")
def real_data() -> Path:
    d = os.environ.get("LORASCOPE_DATA_DIR")
    if not d or not (Path(d) / "mrpc" / "dev.tsv").is_file():
        pytest.skip("set LORASCOPE_DATA_DIR to the shared data folder (with mrpc/ and squad_v2/) for real-data tests")
    return Path(d)


@pytest.fixture()
def small_data(tmp_path) -> Path:
    """A data folder in the shared layout: mrpc/{train,dev,test}.tsv and squad_v2/dev-v2.0.json."""
    return write_data(tmp_path / "data")
