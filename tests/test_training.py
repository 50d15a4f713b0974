"""The shared harness's Trainer: shared section, per-stage overrides, callbacks."""

from __future__ import annotations

from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from cqa_rlhf.config import EarlyStopConfig, OptimConfig, SFTConfig, TrainerConfig, TrainerOverride, parse_section
from cqa_rlhf.training import build_trainer


def test_stage_override_replaces_only_the_keys_it_sets():
    shared = TrainerConfig(precision="32-true", log_every_n_steps=20)
    merged = TrainerOverride(precision="bf16-mixed").apply(shared)
    assert merged.precision == "bf16-mixed" and merged.log_every_n_steps == 20 and merged.accelerator == "cpu"


def test_trainer_carries_the_stage_settings(tmp_path):
    cfg = parse_section({"sft": {"max_steps": 7, "accumulate_grad_batches": 3, "optim": {"gradient_clip_val": 0.5},
                                 "val_check_interval": 4, "monitor": "val_loss",
                                 "early_stopping": {"enabled": True, "patience": 2},
                                 "trainer": {"log_every_n_steps": 50}}}, "sft", SFTConfig)
    t = build_trainer(cfg.trainer.apply(TrainerConfig()), cfg.loop(), tmp_path / "ckpt")
    assert t.max_steps == 7 and t.accumulate_grad_batches == 3 and t.gradient_clip_val == 0.5
    assert t.val_check_interval == 4 and t.log_every_n_steps == 50
    ckpt = next(c for c in t.callbacks if isinstance(c, ModelCheckpoint))
    assert ckpt.dirpath == str(tmp_path / "ckpt") and ckpt.monitor == "val_loss" and ckpt.save_last
    stop = next(c for c in t.callbacks if isinstance(c, EarlyStopping))
    assert stop.patience == 2 and stop.monitor == "val_loss"
    off = build_trainer(TrainerConfig(), cfg.model_copy(update={"early_stopping": EarlyStopConfig()}).loop(),
                        tmp_path / "ckpt2")
    assert not any(isinstance(c, EarlyStopping) for c in off.callbacks)
    assert off.gradient_clip_val == 0.5


def test_gradient_clipping_off_when_zero(tmp_path):
    cfg = SFTConfig(max_steps=1, optim=OptimConfig(gradient_clip_val=0.0))
    t = build_trainer(TrainerConfig(), cfg.loop(), tmp_path / "ckpt")
    assert t.gradient_clip_val is None
