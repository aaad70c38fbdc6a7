"""Fixtures shared by the data tests."""

import pytest

from tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()
