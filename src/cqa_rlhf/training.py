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

    # ---- data parallelism ------------------------------------------------------------------
    def global_mean(self, local_mean: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
        """This process's share of the mean over the whole global batch.

        ``local_mean`` is the mean over this process's ``count`` items (tokens, answers, pairs).
        DDP averages gradients over the W processes, so returning ``local_mean * count * W / N``
        (N: the count summed over processes) makes the averaged gradient that of the mean over
        all N items -- the gradient one process gets from the whole batch -- even when the
        processes hold different counts (token counts always differ). With one process it is
        ``local_mean`` itself."""
        if self.trainer.world_size == 1:
            return local_mean
        n = torch.as_tensor(count, dtype=torch.float64, device=local_mean.device)
        return local_mean * (n * self.global_weight(n)).to(local_mean.dtype)

    def global_weight(self, count: int | torch.Tensor) -> torch.Tensor:
        """W / N in float64: N the ``count`` summed over the W processes (one all-reduce); 1 / count
        with one process. Weighting a process's *sum* by it gives its share of the global mean."""
        n = torch.as_tensor(count, dtype=torch.float64, device=self.device)
        world = self.trainer.world_size
        total = self.trainer.strategy.reduce(n.clone(), reduce_op="sum") if world > 1 else n
        return world / total.clamp(min=1)

    def train_loss(self, local_mean: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
        """:meth:`global_mean` of the batch loss, logged as ``train_loss`` (the global batch's mean)."""
        loss = self.global_mean(local_mean, count)
        self.log("train_loss", loss.detach(), on_step=True, on_epoch=False, batch_size=int(count),
                 sync_dist=self.trainer.world_size > 1)
        return loss

    def on_train_end(self) -> None:
        # Every process must end the fit with the same weights (DDP keeps them in sync through
        # the gradients); a mismatch means a gradient was not synchronised -- fail, never export.
        # Sharded strategies hold a different shard on each process: nothing to compare.
        if shards_weights(self.trainer.strategy):
            return
        self.replica_digest = check_replicas(self.model, self.trainer.world_size)
        if self.trainer.world_size > 1 and self.trainer.is_global_zero:
            print(f"{self.trainer.world_size} processes hold identical weights (sha256 {self.replica_digest})",
                  file=sys.stderr)

    def completed_in_epoch(self) -> int:
        """Training batches the fit loop has completed in the current epoch (for the loader state)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.completed


class ReplicaMismatchError(RuntimeError):
    pass


def weights_digest(model: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every tensor in ``model.state_dict()``."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def shards_weights(strategy) -> bool:
    """FSDP, and DeepSpeed ZeRO stage 3: each process holds a shard of the weights."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    if isinstance(strategy, FSDPStrategy):
        return True
    return isinstance(strategy, DeepSpeedStrategy) and strategy.config.get("zero_optimization", {}).get("stage") == 3


def check_replicas(model: nn.Module, world_size: int) -> str:
    """The weights' digest, checked equal on every process (one all-gather of W strings)."""
    digest = weights_digest(model)
    if world_size > 1:
        import torch.distributed as dist

        digests: list[str | None] = [None] * world_size
        dist.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise ReplicaMismatchError(f"processes ended the fit with different weights: {digests}")
    return digest


def _py_rng_state() -> list:
    version, state, gauss = random.getstate()
    return [version, list(state), gauss]


def _py_rng_from(saved: list) -> tuple:
    version, state, gauss = saved
    return (version, tuple(state), gauss)


# --------------------------------------------------------------------------------------------
# Trainer, checkpoints and resumption
# --------------------------------------------------------------------------------------------
def prepare_run(shared: TrainerConfig, train: TrainConfig, live_dir: str | Path, ckpt_dir: str | Path,
                fp: str, stage: str, callbacks: Sequence[L.Callback] = (),
                curve_step: Callable[[dict], int] | None = None) -> tuple[L.Trainer, Path | None]:
    """The stage's Trainer and the checkpoint its fit resumes from (None: a fresh start).

    The Trainer comes first, so its global rank is known (Lightning reads it from the launcher's
    environment: subprocess DDP, torchrun, SLURM): rank 0 decides whether to resume, clears a
    stale checkpoint directory and trims the curves; other ranks only read, so no two processes
    write the same files. Then the DVCLive logger is attached."""
    trainer = build_trainer(shared, train, live_dir, ckpt_dir, callbacks=callbacks, logger=False)
    zero = trainer.is_global_zero
    resume = resume_checkpoint(ckpt_dir, fp, stage, clean=zero)
    trainer.loggers = [_live_logger(live_dir, resume, curve_step, trim=zero)]
    return trainer, resume


def _live_logger(live_dir: str | Path, resume: Path | None, curve_step: Callable[[dict], int] | None,
                 trim: bool = True):
    """DVCLive logger. When resuming, the curves logged before the checkpoint are kept (the live
    dir is a persistent DVC output) and those logged after it by the interrupted run are dropped,
    as that part is trained again. ``curve_step`` reads the checkpoint's position in the curves'
    x units (default: its global step)."""
    from dvclive.lightning import DVCLiveLogger

    if resume is not None and trim:
        saved = torch.load(resume, map_location="cpu", weights_only=True)
        trim_live_curves(live_dir, curve_step(saved) if curve_step is not None else saved["global_step"])
    # dvcyaml=False and save_dvc_exp=False: DVCLive must not rewrite dvc.yaml or make its own
    # experiments; the stage declares its metrics and plots in dvc.yaml (cache: false).
    return DVCLiveLogger(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None, resume=resume is not None)


def build_trainer(shared: TrainerConfig, train: TrainConfig, live_dir: str | Path, ckpt_dir: str | Path,
                  resume: Path | None = None, callbacks: Sequence[L.Callback] = (),
                  curve_step: Callable[[dict], int] | None = None, logger=None) -> L.Trainer:
    """A Trainer from the shared ``trainer`` section and the stage's settings, logging to DVCLive
    (or to ``logger``; False: none). Stages use :func:`prepare_run`, which also decides resuming."""
    t = train.trainer.apply(shared)
    if logger is None:
        logger = _live_logger(live_dir, resume, curve_step)
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


def resume_checkpoint(ckpt_dir: str | Path, fp: str, stage: str, clean: bool = True) -> Path | None:
    """``last.ckpt`` if it was made with fingerprint ``fp``; otherwise clear the directory (and
    say why), so a run never continues from weights trained with other params or data. With
    ``clean`` False (ranks other than 0) nothing is written: the same answer, read only."""
    ckpt_dir = Path(ckpt_dir)
    last = ckpt_dir / "last.ckpt"
    fp_file = ckpt_dir / FINGERPRINT_FILE
    matches = last.is_file() and fp_file.is_file() and json.loads(fp_file.read_text()).get("fingerprint") == fp
    if not clean:
        return last if matches else None
    if last.is_file() and fp_file.is_file():
        if matches:
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


def load_best_weights(model: nn.Module, ckpt_dir: str | Path, prefix: str = "model.") -> Path:
    """Load the best checkpoint's weights (``last.ckpt`` if there is no best) into ``model``, a
    plain module -- the stage's ``model`` attribute, whose keys carry ``prefix`` in the
    checkpoint. Weights only: no pickled code runs. Stages load into a *fresh* model after the
    fit, so what is evaluated and exported never depends on how the strategy wrapped the one
    that trained (FSDP replaces its layers in place)."""
    ckpt_dir = Path(ckpt_dir)
    best = ckpt_dir / "best.ckpt"
    path = best if best.is_file() else ckpt_dir / "last.ckpt"
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
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
