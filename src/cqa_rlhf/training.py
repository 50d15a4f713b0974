"""The one Lightning training harness shared by every training stage (SFT, reward models, PPO).

What every training stage gets from here: AdamW (:mod:`cqa_rlhf.optim`, correctly rounded) without
weight decay on biases and LayerNorms, gradient-norm clipping with a CPU- and thread-independent norm,
linear warmup (a fraction of the steps) then linear decay (the stage's ``optim`` section),
precision/devices/strategy from the shared ``trainer`` section, the fit loop its module asks for
(:class:`~cqa_rlhf.config.Loop`), best-checkpoint selection on a named metric, optional early
stopping, the freeze options, global-batch losses under data parallelism, a progress bar,
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
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from cqa_rlhf.config import FreezeConfig, Loop, OptimConfig, TrainConfig, TrainerConfig
from cqa_rlhf.errors import ConfigError, CqaError
from cqa_rlhf.exact_math import clip_grad_norm
from cqa_rlhf.io import hash_paths, replace_dir, staging_dir, write_json_atomic, write_text_atomic
from cqa_rlhf.optim import AdamW
from cqa_rlhf.progress import progress_enabled, quiet

FINGERPRINT_FILE = "fingerprint.json"


# --------------------------------------------------------------------------------------------
# Parameters: weight-decay groups and freezing
# --------------------------------------------------------------------------------------------
def is_norm(module: nn.Module) -> bool:
    """A LayerNorm or RMSNorm of any family (Llama's ``LlamaRMSNorm`` is not an ``nn.LayerNorm``)."""
    return isinstance(module, nn.LayerNorm | nn.RMSNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: decayed, and not decayed (biases, norms)."""
    no_decay_ids = {id(p) for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith("bias") or id(p) in no_decay_ids else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# A block's index in any family's block list: GPT-2/GPT-Neo ``h.N``, GPT-NeoX/Llama ``layers.N``.
_LAYER = re.compile(r"(?:^|\.)(?:h|layers|blocks)\.(\d+)\.")
_ATTN = re.compile(r"(?:^|\.)(?:attn|attention|self_attn)\.")
_FF = re.compile(r"(?:^|\.)(?:mlp|feed_forward)\.")


def param_categories(model: nn.Module) -> dict[str, str]:
    """emb | ln | attn | ff | other for every parameter name, from the module that holds it:
    embeddings and norms by type, attention and MLP by their block's sub-module name (the names
    of GPT-2, GPT-Neo, GPT-NeoX and Llama, LoRA adapters inside them included)."""
    out = {}
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(prefix=mod_name, recurse=False):
            if isinstance(module, nn.Embedding):
                out[p_name] = "emb"
            elif is_norm(module):
                out[p_name] = "ln"
            elif _ATTN.search(p_name):
                out[p_name] = "attn"
            elif _FF.search(p_name):
                out[p_name] = "ff"
            else:
                out[p_name] = "other"
    return out


def apply_freeze(model: nn.Module, cfg: FreezeConfig, num_layers: int) -> dict[str, int]:
    """Freeze parameters by the freeze options (never unfreezes: LoRA's frozen base weights
    stay frozen); returns trainable/frozen parameter counts."""
    keep = {i % num_layers for i in cfg.layers_not_to_freeze}
    flags = {"emb": cfg.freeze_emb, "ln": cfg.freeze_ln, "attn": cfg.freeze_attn, "ff": cfg.freeze_ff,
             "other": cfg.freeze_other}
    categories = param_categories(model)
    counts = {"trainable": 0, "frozen": 0}
    for name, p in model.named_parameters():
        layer = _LAYER.search(name)
        frozen = flags[categories[name]] and not (layer and int(layer.group(1)) in keep)
        p.requires_grad_(p.requires_grad and not frozen)
        counts["trainable" if p.requires_grad else "frozen"] += p.numel()
    return counts


# --------------------------------------------------------------------------------------------
# The LightningModule base
# --------------------------------------------------------------------------------------------
class HarnessModule(L.LightningModule):
    """Base of every training stage's module: optimizer, schedule, RNG state in checkpoints.

    A subclass owns its step semantics: :meth:`loop` (what the Trainer runs), :meth:`curve_step`
    (a checkpoint's position on the curves' x axis) and the progress bar's :meth:`progress`."""

    progress_keys: tuple[str, ...] = ("train_loss",)  # logged metrics the progress bar shows

    def __init__(self, model: nn.Module, optim: OptimConfig, fingerprint: str) -> None:
        super().__init__()
        self.model = model
        self.optim = optim
        self.fingerprint = fingerprint

    def loop(self) -> Loop:
        raise NotImplementedError

    @staticmethod
    def curve_step(checkpoint: dict) -> int:
        """Where a checkpoint sits on the DVCLive curves' x axis (default: its global step)."""
        return int(checkpoint["global_step"])

    def progress(self) -> tuple[int, int]:
        """(done, total) training batches of the whole run, for the progress bar."""
        accumulate = self.trainer.accumulate_grad_batches
        return self.trainer.global_step * accumulate, int(self.trainer.estimated_stepping_batches) * accumulate

    def configure_optimizers(self):
        cfg = self.optim
        opt = AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))
        total = int(self.trainer.estimated_stepping_batches)
        sched = get_linear_schedule_with_warmup(opt, round(cfg.warmup_frac * total), max(total, 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's hook (automatic optimisation): :meth:`clip_to`, by norm."""
        if gradient_clip_val:
            self.clip_to(optimizer, gradient_clip_val)

    def clip_to(self, optimizer, max_norm: float) -> None:
        """Clip the gradients' total norm to ``max_norm`` with a norm that every CPU and thread count
        computes alike (:func:`~cqa_rlhf.exact_math.clip_grad_norm`). DeepSpeed and sharded
        strategies hold no whole gradients here: Lightning's own clipping."""
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if shards_weights(self.trainer.strategy) or isinstance(self.trainer.strategy, DeepSpeedStrategy):
            self.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")
        else:
            clip_grad_norm(self.model.parameters(), max_norm)

    def on_fit_start(self) -> None:
        # Trained in train mode, with the dropout its config asks for (a model loaded with
        # from_pretrained starts in eval mode, and Lightning no longer switches it). PPO turns
        # dropout off on purpose (models.disable_dropout), so its mode changes nothing.
        self.model.train()

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
        return self.trainer.world_size / self.all_sum(n).clamp(min=1)

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the data-parallel processes (``x`` itself with one process)."""
        if self.trainer.world_size == 1:
            return x
        return self.trainer.strategy.reduce(x.clone(), reduce_op="sum")

    def train_loss(self, local_mean: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
        """:meth:`global_mean` of the batch loss, logged as ``train_loss`` (the global batch's mean)."""
        loss = self.global_mean(local_mean, count)
        self.log("train_loss", loss.detach(), on_step=True, on_epoch=False, batch_size=int(count),
                 sync_dist=self.trainer.world_size > 1)
        # The curves' x: optimizer steps completed with this one, the unit of a checkpoint's
        # global_step, so a resumed run trims exactly the rows trained after its checkpoint.
        self.log("step", float(self.trainer.global_step + 1), on_step=True, on_epoch=False, batch_size=int(count))
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


class SupervisedModule(HarnessModule):
    """A module trained on a fixed dataset (SFT, the reward models): its loop and optimizer come
    from its :class:`~cqa_rlhf.config.TrainConfig`."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, fingerprint: str) -> None:
        super().__init__(model, cfg.optim, fingerprint)
        self.cfg = cfg

    def loop(self) -> Loop:
        return self.cfg.loop()


class ReplicaMismatchError(CqaError):
    """Processes ended a data-parallel fit with different weights (reported as one line)."""


def weights_digest(model: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every tensor in ``model.state_dict()``."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# Lightning strategy names under which each process holds only a shard of the weights.
SHARDED_STRATEGIES = ("fsdp", "deepspeed_stage_3")


def is_sharded(strategy: str) -> bool:
    """FSDP, and DeepSpeed ZeRO stage 3 (``trainer.strategy`` names): weights split over processes."""
    return strategy.startswith(SHARDED_STRATEGIES)


def refuse_sharded(trainer: TrainerConfig, stage: str, why: str) -> None:
    """A stage that needs whole weights on every process stops with one line under a sharded strategy."""
    if is_sharded(trainer.strategy):
        raise ConfigError(f"trainer.strategy {trainer.strategy!r} shards the policy's weights, "
                          f"and {stage} {why}; use ddp (see the memory table in docs/scaling.md)")


def shards_weights(strategy) -> bool:
    """The running Lightning strategy object shards the weights (see :func:`is_sharded`)."""
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
class StepProgress(L.Callback):
    """One bar for the whole fit, in the module's own units (``module.progress()``: training
    batches, or PPO iterations), with the module's ``progress_keys`` metrics beside it."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar: tqdm | None = None

    def on_train_start(self, trainer: L.Trainer, module) -> None:
        if trainer.is_global_zero:
            done, total = module.progress()
            self.bar = tqdm(total=total, initial=done, desc=self.desc, unit="step", dynamic_ncols=True)

    def on_train_batch_end(self, trainer: L.Trainer, module, outputs, batch, batch_idx: int) -> None:
        if self.bar is None:
            return
        done, _ = module.progress()
        self.bar.update(done - self.bar.n)
        shown = {k.split("/")[-1]: float(trainer.callback_metrics[k]) for k in module.progress_keys
                 if k in trainer.callback_metrics}
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def on_train_end(self, trainer: L.Trainer, module) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def prepare_run(trainer_cfg: TrainerConfig, module: HarnessModule, live_dir: str | Path, ckpt_dir: str | Path,
                fp: str, stage: str, callbacks: Sequence[L.Callback] = ()) -> tuple[L.Trainer, Path | None]:
    """The stage's Trainer (for ``module``'s loop) and the checkpoint its fit resumes from (None:
    a fresh start).

    The Trainer comes first, so its global rank is known (Lightning reads it from the launcher's
    environment: subprocess DDP, torchrun, SLURM): rank 0 decides whether to resume, clears a
    stale checkpoint directory and trims the curves; other ranks only read, so no two processes
    write the same files. Then the DVCLive logger is attached."""
    bar = [StepProgress(stage)] if progress_enabled() else []
    trainer = build_trainer(trainer_cfg, module.loop(), ckpt_dir, callbacks=[*callbacks, *bar], logger=False)
    zero = trainer.is_global_zero
    resume = resume_checkpoint(ckpt_dir, fp, stage, clean=zero)
    if resume is not None and zero:
        saved = torch.load(resume, map_location="cpu", weights_only=True)
        trim_live_curves(live_dir, module.curve_step(saved))
    trainer.loggers = [live_logger(live_dir, resume is not None, rank_zero=zero)]
    return trainer, resume


def live_logger(live_dir: str | Path, resume: bool = False, rank_zero: bool = True):
    """DVCLive logger. When resuming, the curves logged before the checkpoint are kept (the live
    dir is a persistent DVC output; :func:`prepare_run` drops those the interrupted run logged
    after it, as that part is trained again). Its ``Live`` is built here, on rank 0 only (other
    ranks log nothing), so that its summary is written atomically (:func:`atomic_live`)."""
    from dvclive.lightning import DVCLiveLogger

    # dvcyaml=False and save_dvc_exp=False: DVCLive must not rewrite dvc.yaml or make its own
    # experiments; the stage declares its metrics and plots in dvc.yaml (cache: false).
    kwargs = dict(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None, resume=resume)
    return DVCLiveLogger(experiment=atomic_live(**kwargs) if rank_zero else None, **kwargs)


def atomic_live(**kwargs):
    """A DVCLive ``Live`` whose ``metrics.json`` is replaced in one step (written beside it, then
    renamed). DVCLive rewrites it in place at every logged step, so a run killed during that
    write left an empty file, and the resumed run's DVCLive failed reading it."""
    from dvclive import Live
    from dvclive.plots import NumpyEncoder

    class AtomicSummaryLive(Live):
        def make_summary(self):
            if self._step is not None:
                self.summary["step"] = self.step
            write_text_atomic(self.metrics_file, json.dumps(self.summary, indent=4, cls=NumpyEncoder) + "\n")

    return AtomicSummaryLive(**kwargs)


def build_trainer(trainer_cfg: TrainerConfig, loop: Loop, ckpt_dir: str | Path, callbacks: Sequence[L.Callback] = (),
                  logger=False) -> L.Trainer:
    """A Trainer from the resolved ``trainer`` section and a module's loop, checkpointing the best
    and the last state to ``ckpt_dir``; ``logger`` False: none (stages use :func:`prepare_run`,
    which attaches DVCLive and decides resuming)."""
    t = trainer_cfg
    quiet()
    checkpoint = ModelCheckpoint(dirpath=str(ckpt_dir), filename="best", monitor=loop.monitor,
                                 mode=loop.monitor_mode, save_top_k=1, save_last=True,
                                 auto_insert_metric_name=False)
    cbs: list[L.Callback] = [checkpoint, *callbacks]
    if loop.early_stopping is not None:
        cbs.append(EarlyStopping(monitor=loop.monitor, mode=loop.monitor_mode,
                                 patience=loop.early_stopping.patience, min_delta=loop.early_stopping.min_delta))
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, strategy=t.strategy, num_nodes=t.num_nodes,
        precision=t.precision, deterministic=t.deterministic, log_every_n_steps=t.log_every_n_steps,
        max_epochs=loop.max_epochs, max_steps=loop.max_steps,
        val_check_interval=loop.val_check_interval, check_val_every_n_epoch=None,
        limit_val_batches=loop.limit_val_batches, accumulate_grad_batches=loop.accumulate_grad_batches,
        gradient_clip_val=loop.gradient_clip_val, logger=logger, callbacks=cbs,
        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False,  # our batch sampler shards by rank itself
        default_root_dir=str(ckpt_dir),
    )


def trim_live_curves(live_dir: str | Path, step: int) -> None:
    """Drop DVCLive rows logged after ``step``, any line a killed run left half-written, and the
    temporary file of a summary it was writing (:func:`atomic_live`)."""
    for tmp in Path(live_dir).glob(".metrics.json.tmp-*"):
        tmp.unlink()
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
    write_text_atomic(fp_file, json.dumps({"fingerprint": fp}) + "\n")
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
    (tmp / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")  # in staging
    if extra is not None:
        extra(tmp)
    replace_dir(tmp, out)


def publish(trainer: L.Trainer, model: nn.Module, tokenizer: PreTrainedTokenizerBase, out: str | Path, params: dict,
            metrics_path: str | Path, metrics: dict, summary: str,
            extra: Callable[[Path], None] | None = None, timing: tuple[str | Path, float] | None = None) -> None:
    """The end of a training stage, on rank 0 only: the exported model (:func:`export_pretrained`),
    the metrics file, the stage's wall time (``timing``: its live dir and seconds; see
    :func:`write_timing`) and the stage's one summary line on stdout."""
    if not trainer.is_global_zero:
        return
    export_pretrained(model, tokenizer, out, params, extra)
    write_json_atomic(metrics_path, metrics)
    if timing is not None:
        write_timing(*timing)
        # dvc.yaml declares <live_dir>/plots/metrics; a run too short to log a step (one
        # iteration under log_every_n_steps) leaves it empty rather than missing
        (Path(timing[0]) / "plots" / "metrics").mkdir(parents=True, exist_ok=True)
    print(summary)


TIMING_FILE = "timing.json"


def write_timing(live_dir: str | Path, seconds: float) -> None:
    """``<live_dir>/timing.json``: the stage's wall time, for the leaderboard. Not a metric: it
    differs from run to run and machine to machine, and the metrics reproduce exactly."""
    write_json_atomic(Path(live_dir) / TIMING_FILE, {"wall_seconds": round(seconds, 1)})
