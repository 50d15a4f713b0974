"""The one Lightning training harness shared by SFT and both reward models.

What every training stage gets from here: AdamW without weight decay on biases and LayerNorms,
linear warmup (a fraction of the steps) then linear decay, gradient clipping and accumulation,
precision/devices/strategy from the shared ``trainer`` section, validation every N batches,
best-checkpoint selection on a named metric, optional early stopping, the freeze options,
DVCLive logging that never rewrites ``dvc.yaml``, and resumption from ``last.ckpt`` -- only when
the checkpoint was made with the same params and data (its *fingerprint*).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch import nn
from transformers import PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from cqa_rlhf.config import FreezeConfig, TrainConfig, TrainerConfig
from cqa_rlhf.io import hash_paths, replace_dir, staging_dir

FINGERPRINT_FILE = "fingerprint.json"


# --------------------------------------------------------------------------------------------
# Parameters: weight-decay groups and freezing
# --------------------------------------------------------------------------------------------
def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: decayed, and not decayed (biases, LayerNorms)."""
    no_decay_ids = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith("bias") or id(p) in no_decay_ids else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


_LAYER = re.compile(r"\.h\.(\d+)\.")


def param_category(name: str) -> str:
    """emb | ln | attn | ff | other, from GPT-Neo parameter names."""
    if ".wte." in name or ".wpe." in name or name.startswith(("wte.", "wpe.")):
        return "emb"
    if re.search(r"(^|\.)ln_(1|2|f)\.", name):
        return "ln"
    if ".attn." in name:
        return "attn"
    if ".mlp." in name:
        return "ff"
    return "other"


def apply_freeze(model: nn.Module, cfg: FreezeConfig, num_layers: int) -> dict[str, int]:
    """Set ``requires_grad`` by the freeze options; returns trainable/frozen parameter counts."""
    keep = {i % num_layers for i in cfg.layers_not_to_freeze}
    flags = {"emb": cfg.freeze_emb, "ln": cfg.freeze_ln, "attn": cfg.freeze_attn, "ff": cfg.freeze_ff,
             "other": cfg.freeze_other}
    counts = {"trainable": 0, "frozen": 0}
    for name, p in model.named_parameters():
        layer = _LAYER.search(name)
        frozen = flags[param_category(name)] and not (layer and int(layer.group(1)) in keep)
        p.requires_grad_(not frozen)
        counts["frozen" if frozen else "trainable"] += p.numel()
    return counts


# --------------------------------------------------------------------------------------------
# The LightningModule base
# --------------------------------------------------------------------------------------------
class HarnessModule(L.LightningModule):
    """Base of every training stage's module: optimizer, schedule, RNG state in checkpoints."""

    def __init__(self, model: nn.Module, train: TrainConfig, fingerprint: str) -> None:
        super().__init__()
        self.model = model
        self.train_cfg = train
        self.fingerprint = fingerprint

    def configure_optimizers(self):
        cfg = self.train_cfg
        opt = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))
        total = int(self.trainer.estimated_stepping_batches)
        sched = get_linear_schedule_with_warmup(opt, round(cfg.warmup_frac * total), max(total, 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Tensors and plain types only, so resuming loads with weights_only=True.
        checkpoint["cqa_fingerprint"] = self.fingerprint
        checkpoint["cqa_rng"] = {"torch": torch.get_rng_state(), "python": _py_rng_state()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("cqa_rng")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            random.setstate(_py_rng_from(rng["python"]))

    def completed_in_epoch(self) -> int:
        """Training batches the fit loop has completed in the current epoch (for the loader state)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.completed


def _py_rng_state() -> list:
    version, state, gauss = random.getstate()
    return [version, list(state), gauss]


def _py_rng_from(saved: list) -> tuple:
    version, state, gauss = saved
    return (version, tuple(state), gauss)


# --------------------------------------------------------------------------------------------
# Trainer, checkpoints and resumption
# --------------------------------------------------------------------------------------------
def build_trainer(shared: TrainerConfig, train: TrainConfig, live_dir: str | Path, ckpt_dir: str | Path,
                  resume: Path | None = None, callbacks: Sequence[L.Callback] = (),
                  curve_step: Callable[[dict], int] | None = None) -> L.Trainer:
    """The stage's Trainer. ``resume``: the checkpoint the fit resumes from, if any -- then the
    curves logged before it are kept (the live dir is a persistent DVC output) and those logged
    after it by the interrupted run are dropped, as that part is trained again. ``curve_step``
    reads the checkpoint's position in the curves' x units (default: its global step)."""
    from dvclive.lightning import DVCLiveLogger

    t = train.trainer.apply(shared)
    if resume is not None:
        saved = torch.load(resume, map_location="cpu", weights_only=True)
        trim_live_curves(live_dir, curve_step(saved) if curve_step is not None else saved["global_step"])
    # dvcyaml=False and save_dvc_exp=False: DVCLive must not rewrite dvc.yaml or make its own
    # experiments; the stage declares its metrics and plots in dvc.yaml (cache: false).
    logger = DVCLiveLogger(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None,
                           resume=resume is not None)
    checkpoint = ModelCheckpoint(dirpath=str(ckpt_dir), filename="best", monitor=train.monitor,
                                 mode=train.monitor_mode, save_top_k=1, save_last=True,
                                 auto_insert_metric_name=False)
    cbs: list[L.Callback] = [checkpoint, *callbacks]
    if train.early_stopping.enabled:
        cbs.append(EarlyStopping(monitor=train.monitor, mode=train.monitor_mode,
                                 patience=train.early_stopping.patience, min_delta=train.early_stopping.min_delta))
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, strategy=t.strategy, num_nodes=t.num_nodes,
        precision=t.precision, deterministic=t.deterministic, log_every_n_steps=t.log_every_n_steps,
        max_epochs=train.max_epochs, max_steps=train.max_steps,
        val_check_interval=train.val_check_interval, check_val_every_n_epoch=None,
        limit_val_batches=train.limit_val_batches, accumulate_grad_batches=train.accumulate_grad_batches,
        gradient_clip_val=train.gradient_clip_val or None, logger=logger, callbacks=cbs,
        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False,  # our batch sampler shards by rank itself
        default_root_dir=str(ckpt_dir),
    )


def trim_live_curves(live_dir: str | Path, step: int) -> None:
    """Drop DVCLive rows logged after ``step``, and any line a killed run left half-written."""
    for tsv in Path(live_dir).glob("plots/metrics/**/*.tsv"):
        lines = tsv.read_text().splitlines()
        if not lines or "step" not in lines[0].split("\t"):
            continue
        col = lines[0].split("\t").index("step")
        kept = lines[:1]
        for ln in lines[1:]:
            cells = ln.split("\t")
            if len(cells) == len(kept[0].split("\t")) and cells[col].isdigit() and int(cells[col]) <= step:
                kept.append(ln)
        tsv.write_text("\n".join(kept) + "\n")


def code_files() -> list[Path]:
    """Source files of this package loaded by the running stage."""
    return sorted({Path(m.__file__) for name, m in list(sys.modules.items())
                   if name.split(".")[0] == "cqa_rlhf" and getattr(m, "__file__", None)})


def fingerprint(params: dict, inputs: Sequence[str | Path]) -> str:
    """Identity of a training run: resolved params, the content of its inputs and the code that
    trains. A checkpoint with another fingerprint is never resumed: its weights were not made
    by this run's params, data or code."""
    root = Path(__file__).parent
    code = {str(Path(f).relative_to(root)): h for f, h in hash_paths(code_files()).items()}
    blob = json.dumps({"params": params, "inputs": hash_paths(list(inputs)), "code": code},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def resume_checkpoint(ckpt_dir: str | Path, fp: str, stage: str) -> Path | None:
    """``last.ckpt`` if it was made with fingerprint ``fp``; otherwise clear the directory (and
    say why), so a run never continues from weights trained with other params or data."""
    ckpt_dir = Path(ckpt_dir)
    last = ckpt_dir / "last.ckpt"
    fp_file = ckpt_dir / FINGERPRINT_FILE
    if last.is_file() and fp_file.is_file():
        if json.loads(fp_file.read_text()).get("fingerprint") == fp:
            print(f"{stage}: resuming from {last}", file=sys.stderr)
            return last
        print(f"{stage}: not resuming: {last} was made with other params or data; starting fresh",
              file=sys.stderr)
    elif ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        print(f"{stage}: not resuming: no usable last.ckpt in {ckpt_dir}; starting fresh", file=sys.stderr)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    ckpt_dir.mkdir(parents=True)
    fp_file.write_text(json.dumps({"fingerprint": fp}) + "\n")
    return None


def load_best_weights(module: L.LightningModule, ckpt_dir: str | Path) -> Path:
    """Load the best checkpoint's weights into ``module`` (weights only, no pickled code)."""
    ckpt_dir = Path(ckpt_dir)
    best = ckpt_dir / "best.ckpt"
    path = best if best.is_file() else ckpt_dir / "last.ckpt"
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    return path


def export_pretrained(model: nn.Module, tokenizer: PreTrainedTokenizerBase, out: str | Path, params: dict,
                      extra: Callable[[Path], None] | None = None) -> None:
    """A ``save_pretrained`` directory (safetensors) with the tokenizer and the resolved params
    beside it (and whatever ``extra`` writes into it), written to a staging directory and
    swapped in whole: a crash mid-write leaves the previous export in place."""
    out = Path(out)
    tmp = staging_dir(out)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    if extra is not None:
        extra(tmp)
    replace_dir(tmp, out)
