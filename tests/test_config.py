"""Typed params: unknown keys and wrong types fail with the dotted key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from cqa_rlhf.config import DataConfig, SynthConfig, load_section, parse_section
from cqa_rlhf.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_repo_params_load_into_typed_configs():
    data = load_section(ROOT / "params.yaml", "data", DataConfig)
    synth = load_section(ROOT / "params.yaml", "synth", SynthConfig)
    assert data.splits.train == 0.9 and data.pairs.min_score_gap == 2
    assert synth.n_questions > 0
    # The default source is the synthetic site's output: one path, two roles, kept consistent.
    assert data.source == synth.out


def test_unknown_nested_key_is_named():
    with pytest.raises(ConfigError) as exc:
        parse_section({"data": {"filters": {"min_answer_char": 3}}}, "data", DataConfig, "p.yaml")
    assert str(exc.value) == "p.yaml: data.filters.min_answer_char: unknown key"


def test_wrong_type_is_named_with_value():
    with pytest.raises(ConfigError) as exc:
        parse_section({"data": {"split_seed": "zero"}}, "data", DataConfig, "p.yaml")
    msg = str(exc.value)
    assert msg.startswith("p.yaml: data.split_seed: ") and "'zero'" in msg
    # strict: a bool is not an int, a string is not a bool
    with pytest.raises(ConfigError, match=r"data\.filters\.dedup_answers"):
        parse_section({"data": {"filters": {"dedup_answers": "yes"}}}, "data", DataConfig)
    with pytest.raises(ConfigError, match=r"synth\.seed"):
        parse_section({"synth": {"seed": True}}, "synth", SynthConfig)


def test_literal_and_range_checks():
    with pytest.raises(ConfigError, match=r"data\.score\.transform"):
        parse_section({"data": {"score": {"transform": "sqrt"}}}, "data", DataConfig)
    with pytest.raises(ConfigError, match=r"data\.pairs\.min_score_gap"):
        parse_section({"data": {"pairs": {"min_score_gap": 0}}}, "data", DataConfig)
    with pytest.raises(ConfigError, match=r"data\.splits: .*sum to 1"):
        parse_section({"data": {"splits": {"train": 0.5, "val": 0.1, "test": 0.1}}}, "data", DataConfig)


def test_int_is_accepted_for_float():
    cfg = parse_section({"data": {"splits": {"train": 1, "val": 0, "test": 0}}}, "data", DataConfig)
    assert cfg.splits.train == 1.0


def test_configs_are_frozen():
    cfg = DataConfig()
    with pytest.raises(Exception):
        cfg.source = "x"  # type: ignore[misc]


def test_yaml_syntax_error_names_line(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("data:\n  source: [unclosed\n  out: x\n")
    with pytest.raises(ConfigError) as exc:
        load_section(p, "data", DataConfig)
    assert str(exc.value).startswith(f"{p}: line ")
    assert "\n" not in str(exc.value)


def test_section_must_be_mapping(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("data: 3\n")
    with pytest.raises(ConfigError, match="data: must be a mapping"):
        load_section(p, "data", DataConfig)


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_section(tmp_path / "nope.yaml", "data", DataConfig)
