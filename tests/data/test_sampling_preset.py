"""--preset vicuna: the paper's Vicuna-benchmark sampling (nucleus, top-p 0.9, temperature 0.7)."""

from __future__ import annotations

import pytest

from qlora.cli import build_parser
from qlora.cli.options import settings_from


@pytest.mark.parametrize("verb", [["generate", "hi"], ["chat"], ["eval", "generate"]])
def test_vicuna_preset_on_every_generating_verb(verb):
    s = settings_from(build_parser().parse_args(verb + ["--preset", "vicuna"]))
    assert (s.temperature, s.top_p, s.top_k) == (0.7, 0.9, 0)
    s = settings_from(build_parser().parse_args(verb + ["--preset", "vicuna", "--temperature", "0.2"]))
    assert (s.temperature, s.top_p) == (0.2, 0.9)  # an explicit flag wins
    s = settings_from(build_parser().parse_args(verb))
    assert (s.temperature, s.top_p) == (0.0, 1.0)  # no preset: greedy, as before
