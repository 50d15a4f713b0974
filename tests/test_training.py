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


class _Unwritable:
    """A value json cannot encode: the summary write fails part-way through, as a kill would."""


def _summary_write_fails(live) -> None:
    live.summary["zzz"] = _Unwritable()  # last key: json has written the others when it fails
    try:
        live.make_summary()
    except TypeError:
        pass
    else:
        raise AssertionError("the summary write did not fail")
    del live.summary["zzz"]


def test_dvclive_own_summary_write_is_not_atomic(tmp_path):
    """Why :func:`atomic_live` exists: DVCLive rewrites metrics.json in place, so a write that
    stops part-way leaves a file the next resumed run cannot read."""
    import json

    from dvclive import Live

    live = Live(dir=str(tmp_path), dvcyaml=False, save_dvc_exp=False, report=None)
    live.log_metric("train/loss", 1.5)
    live.next_step()
    _summary_write_fails(live)
    text = (tmp_path / "metrics.json").read_text()
    try:
        json.loads(text)
    except json.JSONDecodeError:
        pass
    else:
        raise AssertionError(f"DVCLive now writes its summary atomically: {text!r}")


def test_interrupted_summary_write_keeps_the_previous_summary_and_resumes(tmp_path):
    import json

    from cqa_rlhf.training import atomic_live, live_logger, trim_live_curves

    live = atomic_live(dir=str(tmp_path), dvcyaml=False, save_dvc_exp=False, report=None)
    for loss in (1.5, 1.25):
        live.log_metric("train/loss", loss)
        live.next_step()
    before = (tmp_path / "metrics.json").read_bytes()
    assert json.loads(before) == {"train": {"loss": 1.25}, "step": 1}
    _summary_write_fails(live)
    assert (tmp_path / "metrics.json").read_bytes() == before
    assert not list(tmp_path.glob(".metrics.json.tmp-*"))

    (tmp_path / ".metrics.json.tmp-999").write_text('{"tr')  # left by a run killed while writing
    trim_live_curves(tmp_path, 1)
    assert not list(tmp_path.glob(".metrics.json.tmp-*"))
    resumed = live_logger(tmp_path, resume=True)
    assert resumed.experiment.step == 2 and resumed.experiment.summary["train"]["loss"] == 1.25
    resumed.log_metrics({"train/loss": 1.0}, step=2)
    resumed.experiment.make_summary()
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"train": {"loss": 1.0}, "step": 2}
    assert (tmp_path / "plots/metrics/train/loss.tsv").read_text().split() == \
        ["step", "loss", "0", "1.5", "1", "1.25", "2", "1.0"]
