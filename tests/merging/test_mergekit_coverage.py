"""What mergekit 0.1.5 offers, read from mergekit itself: every method and parameter is known here, every
config key is a key of ours, and the README's compatibility section names each of them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from modelcypher.api import plan_merge
from modelcypher.errors import UserError
from modelcypher.merging import config as ours
from modelcypher.merging.registry import MERGEKIT_METHODS, MERGEKIT_PARAMETERS, get_method

mergekit_methods = pytest.importorskip("mergekit.merge_methods")
mergekit_config = pytest.importorskip("mergekit.config")

README = (Path(__file__).parents[2] / "README.md").read_text()
SECTION = README[README.index("### Compatibility with mergekit"):]
SECTION = SECTION[:SECTION.index("\n## ")]


def mergekit_catalogue() -> dict[str, set[str]]:
    """Each registered mergekit method and the parameters it takes."""
    out = {}
    for m in mergekit_methods.registered_methods():
        if hasattr(m, "spec"):
            out[m.spec.name] = {p.name for p in m.spec.parameters}
        else:
            out[m.name()] = {p.name for p in [*m.parameters(), *m.tensor_parameters()]}
    return out


def test_every_mergekit_method_and_parameter_is_known_here():
    catalogue = mergekit_catalogue()
    assert set(catalogue) == MERGEKIT_METHODS
    assert set().union(*catalogue.values()) == MERGEKIT_PARAMETERS
    for name, params in catalogue.items():
        method = get_method(name)
        known = {*method.model_params, *method.global_params, *method.inert}
        assert params <= known, f"{name}: {params - known}"


def test_every_mergekit_config_key_is_a_key_here():
    pairs = [(mergekit_config.MergeConfiguration, ours.MergeConfig), (mergekit_config.InputModelDefinition,
             ours.ModelEntry), (mergekit_config.InputSliceDefinition, ours.SliceSource),
             (mergekit_config.OutputSliceDefinition, ours.Slice), (mergekit_config.OutputModuleDefinition, ours.Module)]
    for theirs, mine in pairs:
        missing = set(theirs.model_fields) - set(mine.model_fields) - set(ours.NOT_YET)
        if mine is ours.Slice:
            missing -= set(ours.SLICE_NOT_YET)
        assert not missing, f"{theirs.__name__}: {missing}"


def test_the_readme_names_every_method_and_key():
    named = set(re.findall(r"`([a-z_0-9]+)`", SECTION))
    keys = {*mergekit_config.MergeConfiguration.model_fields, *mergekit_config.OutputSliceDefinition.model_fields}
    assert MERGEKIT_METHODS <= named, MERGEKIT_METHODS - named
    assert MERGEKIT_PARAMETERS <= named, MERGEKIT_PARAMETERS - named
    assert keys <= named, keys - named


def test_a_parameter_of_another_mergekit_method_is_ignored_with_a_note_and_a_typo_refused(tmp_path):
    from checkpoints import build, finetune, save

    base = build("llama", num_hidden_layers=2)
    paths = [str(save(m, tmp_path / n)) for n, m in [("base", base), ("a", finetune(base, 1, 0.02)),
                                                    ("b", finetune(base, 2, 0.02))]]
    cfg = {"merge_method": "multislerp", "base_model": paths[0], "parameters": {"normalize": True, "int8_mask": True},
           "models": [{"model": p, "parameters": {"weight": 0.5}} for p in paths[1:]]}
    notes = plan_merge(cfg).notes
    assert any("'normalize' ignored: multislerp does not take it" in n for n in notes)
    with pytest.raises(UserError, match="has no parameter 'normalise'"):
        plan_merge({**cfg, "parameters": {"normalise": True}})
    with pytest.raises(UserError, match="has no parameter 'normalize'"):  # not a mergekit method: no leniency
        plan_merge({**cfg, "merge_method": "tsv"})
