"""EmerDiffConfig: one home for every setting; each bad value is one error naming its field, in Python and the CLI;
the segmenter built from keywords or from a config is the same; per-call settings change, load-time ones do not."""

import dataclasses
import os
import typing

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from conftest import FAST_SEGMENTER, changed_settings

from emerdiff_pl import cli
from emerdiff_pl.config import EmerDiffConfig
from emerdiff_pl.segmenter import EmerDiffSegmenter

FIELDS = dataclasses.fields(EmerDiffConfig)
HINTS = typing.get_type_hints(EmerDiffConfig)


def _bad_values() -> list[tuple[str, object]]:
    """For every setting, values its type or range refuses (derived from the dataclass, not listed by hand)."""
    cases = []
    for spec in FIELDS:
        hint, limits = HINTS[spec.name], spec.metadata
        cases.append((spec.name, 1.5j))  # no setting is complex
        if typing.get_origin(hint) is typing.Literal or hint is bool:
            cases.append((spec.name, "no-such-choice"))
        if "at_least" in limits:
            low = limits["at_least"]
            below = (
                low - 1
                if isinstance(spec.default, int | tuple) or spec.default in (None, "auto")
                else low - 0.5
            )
            cases.append((spec.name, (below,) if isinstance(spec.default, tuple) else below))
        if "above" in limits:
            cases.append((spec.name, limits["above"]))
        if hint is int:
            cases.append((spec.name, True))  # a bool is no number
    return cases


@pytest.mark.parametrize(("name", "value"), _bad_values(), ids=lambda v: str(v))
def test_each_bad_value_is_an_error_naming_its_field(name: str, value: object):
    with pytest.raises(ValueError, match=rf"^model\.{name} must "):
        EmerDiffConfig(**{name: value})
    with pytest.raises(ValueError, match=rf"^model\.{name} must "):  # the segmenter checks the same way
        EmerDiffSegmenter(**{name: value})


def test_the_example_of_the_issue_reads_as_it_should():
    with pytest.raises(ValueError, match=r"^model\.num_masks must be ≥ 1, got 0$"):
        EmerDiffConfig(num_masks=0)
    with pytest.raises(ValueError, match=r"^model\.refine_dilations must not be empty$"):
        EmerDiffConfig(refine_dilations=())


def test_every_field_has_a_default_a_type_and_a_doc():
    doc = EmerDiffConfig.__doc__
    for spec in FIELDS:
        assert spec.default is not dataclasses.MISSING, spec.name
        assert spec.name in HINTS
        assert f"\n        {spec.name}: " in doc, f"{spec.name} has no doc in EmerDiffConfig's Attributes"
    positions = [doc.index(f"\n        {spec.name}: ") for spec in FIELDS]
    assert positions == sorted(positions)  # documented in field order


def test_defaults_pass_their_own_checks_and_lists_become_tuples():
    config = EmerDiffConfig(refine_dilations=[1, 2], modulation_strength=10)
    assert config.refine_dilations == (1, 2) and config == EmerDiffConfig(refine_dilations=(1, 2))
    assert EmerDiffConfig().hparams() == {spec.name: spec.default for spec in FIELDS}


def test_cli_reports_a_bad_value_naming_the_flag(tmp_path, capsys):
    args = ["predict", "--config", "configs/tiny.yaml", "--data.folder", str(tmp_path)]
    assert cli.main([*args, "--writer.output_dir", str(tmp_path / "out"), "--model.kmeans_n_init", "0"]) == 2
    err = capsys.readouterr().err
    assert "--model.kmeans_n_init must be ≥ 1, got 0" in err and "Traceback" not in err


def test_keywords_and_a_config_build_the_same_segmenter():
    from_keywords = EmerDiffSegmenter(**FAST_SEGMENTER)
    from_config = EmerDiffSegmenter.from_config(EmerDiffConfig(**FAST_SEGMENTER))
    assert from_keywords.config == from_config.config == EmerDiffConfig(**FAST_SEGMENTER)
    assert dict(from_keywords.hparams) == from_keywords.config.hparams()  # every setting, defaults included
    assert from_keywords.input_policy == from_keywords.config.input_policy
    with pytest.raises(TypeError, match="num_mask"):
        EmerDiffSegmenter(num_mask=4)  # a typo is not silently a default


def test_per_call_settings_change_on_a_loaded_model_and_load_time_ones_do_not():
    model = EmerDiffSegmenter(**FAST_SEGMENTER)
    model.configure_model()
    with changed_settings(model, num_masks=3, modulation_strength=2.0):
        assert model.hparams.num_masks == 3 and model.config.modulation_strength == 2.0
    assert model.hparams.num_masks == FAST_SEGMENTER["num_masks"]
    with pytest.raises(ValueError, match="feature_layer cannot change once the model is loaded"):
        model.config = dataclasses.replace(model.config, feature_layer="down_blocks.1.attentions.0.attn2")
    with pytest.raises(ValueError, match="model.num_masks must be ≥ 1"):
        model.config = dataclasses.replace(model.config, num_masks=0)
