"""Every shipped example config is valid (paths aside)."""

from pathlib import Path

import pytest
import yaml

from modelcypher.merging.config import parse_config
from modelcypher.merging.pipeline import read_pipeline
from modelcypher.merging.registry import get_method

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_parses_and_names_a_known_method(path):
    stages = read_pipeline(path)  # a pipeline's stages, checked as a whole (names, references, order)
    for cfg in [s.config for s in stages] if stages else [parse_config(path)]:
        method = get_method(cfg.merge_method)
        known = set(method.model_params) | set(method.global_params) | ({"data"} if method.stats else set())
        for params in [cfg.parameters] + [e.parameters for e in cfg.models or []]:
            assert set(params) <= known
    assert all(yaml.safe_load_all(path.read_text()))


def test_there_are_examples():
    assert len(EXAMPLES) >= 5
