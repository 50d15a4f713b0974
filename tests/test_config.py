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


# --------------------------------------------------------------------------------------------
# Trainer settings, DVC-written floats, presets
# --------------------------------------------------------------------------------------------
def test_every_section_of_the_repo_params_loads():
    from cqa_rlhf.config import OPEN_SECTIONS, SECTIONS, TOP_LEVEL, read_params

    assert set(read_params(ROOT / "params.yaml")) == set(SECTIONS) | set(TOP_LEVEL) | set(OPEN_SECTIONS)
    for name, model in SECTIONS.items():
        load_section(ROOT / "params.yaml", name, model)


def test_strategy_and_precision_are_lightning_names():
    from typing import get_args

    from lightning.pytorch.strategies import StrategyRegistry

    from cqa_rlhf.config import Precision, Strategy, TrainerConfig

    assert set(get_args(Strategy)) - {"auto"} <= set(StrategyRegistry.available_strategies())
    for bad, key in (({"strategy": "fdsp"}, "trainer.strategy"), ({"precision": "bf16"}, "trainer.precision")):
        with pytest.raises(ConfigError) as exc:
            parse_section({"trainer": bad}, "trainer", TrainerConfig, "p.yaml")
        assert str(exc.value).startswith(f"p.yaml: {key}: ") and "\n" not in str(exc.value)
    assert "bf16-mixed" in get_args(Precision)


def test_floats_written_by_dvc_are_floats(tmp_path):
    """DVC (ruamel, YAML 1.2) writes 0.00002 as `2e-05`, a string to plain PyYAML."""
    from cqa_rlhf.config import SFTConfig, read_params, seeded

    path = tmp_path / "params.yaml"
    path.write_text("seed: 3\nsft:\n  optim:\n    lr: 2e-05\n    weight_decay: 1E-2\n")
    cfg = parse_section(seeded(read_params(path), path), "sft", SFTConfig, path)
    assert cfg.optim.lr == 2e-05 and cfg.optim.weight_decay == 0.01 and cfg.seed == 3


@pytest.mark.parametrize("preset", sorted((ROOT / "presets").glob("*.yaml")), ids=lambda p: p.stem)
def test_presets_check_against_params_and_print_dvc_flags(preset):
    from cqa_rlhf.presets import preset_flags

    flags = preset_flags(preset, ROOT / "params.yaml")
    assert flags and all(f.startswith("-S ") and " " not in f[3:] for f in flags)
    gpu = not preset.stem.endswith("-cpu")  # GPU presets train in bf16; the CPU preset in float32
    assert any(f.startswith("-S trainer.precision=bf16-mixed") for f in flags) == gpu


def test_gpu_smoke_graph_is_checked_on_cpu():
    """bench/gpu_smoke.sh runs where a GPU is lent: its graph preset must pass the params checks
    and the script must parse, before any GPU sees them."""
    import subprocess

    from cqa_rlhf.presets import preset_flags

    flags = preset_flags(ROOT / "bench" / "gpu_smoke_graph.yaml", ROOT / "params.yaml")
    assert "-S trainer.accelerator=gpu" in flags and "-S trainer.precision=bf16-mixed" in flags
    assert "-S model.config.hidden_size=768" in flags and "-S model.config.num_layers=12" in flags
    for stage in ("sft", "reward.regression", "reward.classification", "dpo"):
        assert f"-S {stage}.max_steps=20" in flags
    for stage in ("ppo", "grpo", "online_dpo"):
        assert f"-S {stage}.iterations=4" in flags
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_smoke.sh")]).returncode == 0


def test_preset_with_an_unknown_key_or_section_is_refused(tmp_path):
    from cqa_rlhf.presets import preset_flags

    bad = tmp_path / "bad.yaml"
    bad.write_text("sft:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"sft\.learning_rate: unknown key"):
        preset_flags(bad, ROOT / "params.yaml")
    bad.write_text("trainer:\n  strategy: fdsp\n")
    with pytest.raises(ConfigError, match=r"trainer\.strategy"):
        preset_flags(bad, ROOT / "params.yaml")
    bad.write_text("sfft:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"sfft"):
        preset_flags(bad, ROOT / "params.yaml")


def test_a_preset_applied_by_dvc_exp_run_gives_valid_params(tmp_path):
    """The printed flags through real `dvc exp run` (a one-stage graph over params.yaml): the
    params file DVC writes loads into every typed config and holds the preset's values."""
    import shutil
    import subprocess
    import sys

    import yaml

    from conftest import init_dvc_repo, stage_env
    from cqa_rlhf.config import SECTIONS, read_params
    from cqa_rlhf.presets import preset_flags

    preset = ROOT / "presets" / "gpt-neo-1.3b-8gpu-fsdp.yaml"
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").write_text("stages:\n  show:\n    cmd: python -c pass\n    params:\n      - model\n")
    env = stage_env()
    dvc = [str(Path(sys.executable).parent / "dvc")]
    init_dvc_repo(tmp_path)
    flags = [part for f in preset_flags(preset, tmp_path / "params.yaml") for part in f.split(" ", 1)]
    proc = subprocess.run(dvc + ["exp", "run", *flags], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    params = read_params(tmp_path / "params.yaml")
    for name, model in SECTIONS.items():
        load_section(tmp_path / "params.yaml", name, model)
    want = yaml.safe_load(preset.read_text())
    assert params["sft"]["optim"]["lr"] == want["sft"]["optim"]["lr"] == 2e-05  # written by DVC as `2e-05`
    assert params["ppo"]["trainer"] == {"log_every_n_steps": 1, "strategy": "ddp"}
    assert params["trainer"]["strategy"] == "fsdp" and params["model"]["gradient_checkpointing"] is True


@pytest.mark.parametrize("section", ["ppo", "evaluate"])
def test_sampled_ids_must_fit_the_reward_model_input(section):
    """The reward models score the sampled prompt + answer ids whole: a sample that cannot fit in
    max_length is refused when params are read, in one line naming the section."""
    from cqa_rlhf.config import EvaluateConfig, PPOConfig

    model = {"ppo": PPOConfig, "evaluate": EvaluateConfig}[section]
    bad = {section: {"max_prompt_length": 128, "max_length": 200, "sample": {"max_new_tokens": 96}}}
    with pytest.raises(ConfigError) as exc:
        parse_section(bad, section, model, "p.yaml")
    msg = str(exc.value)
    assert msg.startswith(f"p.yaml: {section}: ") and "max_prompt_length + sample.max_new_tokens" in msg
    assert "\n" not in msg
    ok = {section: {"max_prompt_length": 128, "max_length": 224, "sample": {"max_new_tokens": 96}}}
    assert parse_section(ok, section, model, "p.yaml").max_length == 224


# --------------------------------------------------------------------------------------------
# The one seed switch
# --------------------------------------------------------------------------------------------
def test_top_level_seed_is_every_training_and_sampling_stage_seed(tmp_path):
    from cqa_rlhf.config import SEEDED, SECTIONS, seeded
    from cqa_rlhf.stages.common import Params

    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text().replace("\nseed: 0 ", "\nseed: 7 ", 1))
    p = Params.read(str(params))
    assert p.section("sft", SECTIONS["sft"]).seed == 7 and p.section("ppo", SECTIONS["ppo"]).seed == 7
    reward = p.section("reward", SECTIONS["reward"])
    assert reward.regression.seed == reward.classification.seed == 7
    assert p.section("base", SECTIONS["base"]).seed == p.section("evaluate", SECTIONS["evaluate"]).seed == 7
    # the data stay the data: the same questions under every seed
    assert p.section("synth", SynthConfig).seed == 1234 and p.section("data", DataConfig).split_seed == 0
    for section in ("online_dpo", "bon", "overopt"):
        assert p.section(section, SECTIONS[section]).seed == 7, section
    assert seeded({})["sft"]["seed"] == 0 and len(SEEDED) == 11


@pytest.mark.parametrize("text, key", [("seed: 1\nsft:\n  seed: 2\n", "sft.seed"),
                                       ("reward:\n  classification:\n    seed: 2\n", "reward.classification.seed"),
                                       ("seed: -1\n", "seed"), ("seed: true\n", "seed"), ("seed: '3'\n", "seed")])
def test_a_second_seed_or_a_bad_one_is_a_one_line_error(tmp_path, text, key):
    from cqa_rlhf.stages.common import Params

    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        Params.read(str(path))
    assert str(exc.value).startswith(f"{path}: {key}: ") and "\n" not in str(exc.value)


def test_lora_names_every_trained_policy_stage():
    from cqa_rlhf.config import LoraConfig

    lora = LoraConfig(r=8)
    assert all(lora.applies(s) for s in ("sft", "reward", "ppo", "dpo", "grpo", "online_dpo"))
    assert not LoraConfig(r=8, stages=["sft"]).applies("online_dpo") and not LoraConfig(r=0).applies("sft")
