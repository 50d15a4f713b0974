"""Typed stage configs loaded from ``params.yaml``.

Each stage reads exactly one section (named after the stage) into a frozen pydantic model that
rejects unknown keys and wrong types, so a typo in ``params.yaml`` fails loudly with the key's
dotted path instead of silently falling back to a default. No raw dicts travel past ``main()``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cqa_rlhf.errors import ConfigError

C = TypeVar("C", bound="Section")


class Section(BaseModel):
    """Base of every params section: strict types, no unknown keys, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# --------------------------------------------------------------------------------------------
# synth: the embedded default site
# --------------------------------------------------------------------------------------------
class SynthConfig(Section):
    """The offline synthetic community-QA site, written as a Stack Exchange dump."""

    out: str = "data/raw/synthetic"  # directory; the dump is <out>/Posts.xml
    seed: int = 1234
    n_questions: int = Field(2000, ge=1)
    min_answers: int = Field(1, ge=0)
    max_answers: int = Field(6, ge=1)
    p_accepted: float = Field(0.8, ge=0.0, le=1.0)  # questions that have an accepted answer
    p_accept_best: float = Field(0.85, ge=0.0, le=1.0)  # accepted answer is the gold-best one
    vote_noise: float = Field(1.5, ge=0.0)  # std of the Gaussian noise on votes

    @model_validator(mode="after")
    def _answers_range(self) -> SynthConfig:
        if self.min_answers > self.max_answers:
            raise ValueError("min_answers must be <= max_answers")
        return self


# --------------------------------------------------------------------------------------------
# data: ingestion of raw dumps into the prepared Parquet tables
# --------------------------------------------------------------------------------------------
class SplitRatios(Section):
    train: float = Field(0.9, ge=0.0, le=1.0)
    val: float = Field(0.05, ge=0.0, le=1.0)
    test: float = Field(0.05, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitRatios:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1, got {total:g}")
        return self


class Filters(Section):
    min_question_chars: int = Field(10, ge=0)
    max_question_chars: int = Field(4000, ge=1)
    min_answer_chars: int = Field(10, ge=0)
    max_answer_chars: int = Field(4000, ge=1)
    min_answers_per_question: int = Field(1, ge=1)
    dedup_answers: bool = True  # drop answers whose normalised text repeats one to the same question


class ScoreScaling(Section):
    """How the ``reward`` table's ``score`` column is derived from raw votes.

    transform: ``raw`` keeps votes; ``log`` is sign(s)*log1p(|s|), which tames the long tail
    of popular answers. normalize: ``none`` or ``question`` (z-score within each question, 0 when
    the question's answers all have the same score), which removes per-question popularity.
    """

    transform: Literal["raw", "log"] = "log"
    normalize: Literal["none", "question"] = "none"


class PairsConfig(Section):
    """Preference pairs: accepted vs. others, and higher vs. lower score (gap >= min_score_gap)."""

    accepted: bool = True
    by_score: bool = True
    min_score_gap: int = Field(2, ge=1)  # >= 1 so equal scores never make a pair
    max_pairs_per_question: int = Field(10, ge=1)


class HFSourceConfig(Section):
    """A ``datasets`` source (``data.format: hf``; see cqa_rlhf.data.hf_source): its layout,
    the columns that play each role where they differ from the layout's defaults, and where
    split names other than train/validation/test go."""

    layout: Literal["auto", "pairs", "labelled_pairs", "ranked_answers"] = "auto"
    columns: dict[str, str] = {}  # role -> column (or struct field), e.g. {question: title}
    splits: dict[str, Literal["train", "val", "test"]] = {}  # dataset split -> project split
    revision: str | None = None  # a Hub source's revision (branch, tag or commit)


class DataConfig(Section):
    # Posts.xml, a site folder with Posts.xml, a site .7z, the original project's JSON, a
    # ``datasets`` source (a save_to_disk folder, parquet/JSON-lines files, hf://owner/name), or a
    # folder of site folders/.7z files (several sites at once; ``sites`` picks some of them).
    source: str = "data/raw/synthetic"
    sites: list[str] | None = None  # names of sites inside ``source``; null: every site there
    format: Literal["auto", "stackexchange", "json", "hf"] = "auto"
    hf: HFSourceConfig = HFSourceConfig()
    out: str = "data/prepared"
    metrics: str = "metrics/data.json"
    split_seed: int = 0
    splits: SplitRatios = SplitRatios()
    filters: Filters = Filters()
    score: ScoreScaling = ScoreScaling()
    pairs: PairsConfig = PairsConfig()
    # Runtime knobs; none of them changes the output (tests check that).
    memory_budget_mb: int = Field(1024, ge=64)  # bounds prepare's peak memory, not the input size
    shards: int | None = Field(None, ge=1)  # null: planned from the input size and the budget
    workers: int | None = Field(None, ge=0)  # cleaning processes; 0: in-process; null: auto
    workdir: str | None = None  # scratch for spill files; null: next to `out`

    @model_validator(mode="after")
    def _filter_bounds(self) -> DataConfig:
        f = self.filters
        if f.min_question_chars > f.max_question_chars or f.min_answer_chars > f.max_answer_chars:
            raise ValueError("filters: min_*_chars must be <= max_*_chars")
        return self


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
class ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads ``2e-05`` as a float. PyYAML follows YAML 1.1,
    where a float needs a dot; DVC writes params with ruamel (YAML 1.2), so
    ``dvc exp run -S sft.lr=0.00002`` leaves ``lr: 2e-05`` in params.yaml, which plain
    ``yaml.safe_load`` returns as the *string* '2e-05'."""


ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789"))


def read_params(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 at byte {exc.start}") from None
    try:
        data = yaml.load(text, Loader=ParamsLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: {where}invalid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return data


def _format_validation(path: Path, section: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (section, *err["loc"]))
        if err["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown key")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            parts.append(f"{loc}: {err['msg']}{shown}")
    return f"{path}: " + "; ".join(parts)


def parse_section(data: dict, section: str, model: type[C], path: str | Path = "params.yaml") -> C:
    """Validate ``data[section]`` into ``model``; errors name the file and the dotted key."""
    path = Path(path)
    raw = data.get(section, {})
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: {section}: must be a mapping, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation(path, section, exc)) from None


def load_section(path: str | Path, section: str, model: type[C]) -> C:
    """Read one section of a params file into its typed config (seeds from the top-level ``seed``)."""
    return parse_section(seeded(read_params(path), path), section, model, path)


# The sections whose ``seed`` is the top-level ``seed``: every training and sampling stage. The
# data stages keep their own (synth.seed, data.split_seed): runs under different seeds are then
# judged on the same held-out questions.
SEEDED = ("sft", "reward.regression", "reward.classification", "ppo", "dpo", "grpo", "online_dpo", "bon", "overopt",
          "base", "evaluate")


def seeded(data: dict, path: str | Path = "params.yaml") -> dict:
    """``data`` with the top-level ``seed`` (default 0) copied into every section of
    :data:`SEEDED`: one switch (``dvc exp run -S seed=3``) reruns the pipeline under another seed.
    A section's own ``seed`` key is refused, so there is one source of truth."""
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"{path}: seed: must be a non-negative integer, got {seed!r}")
    out = dict(data)
    for dotted in SEEDED:
        *parents, leaf = dotted.split(".")
        holder = out
        for key in parents:
            holder[key] = dict(holder.get(key) or {})
            holder = holder[key]
        section = holder.get(leaf) or {}
        if isinstance(section, dict) and "seed" in section:
            raise ConfigError(f"{path}: {dotted}.seed: set the top-level seed instead (every stage takes its seed from it)")
        holder[leaf] = {**section, "seed": seed} if isinstance(section, dict) else section
    return out


# --------------------------------------------------------------------------------------------
# Shared sections: prompt, model, tokenizer, trainer
# --------------------------------------------------------------------------------------------
class PromptConfig(Section):
    """The one prompt template of every stage; ``{question}`` appears exactly once."""

    template: str = "Question: {question}\nAnswer:"
    # true: the tokenizer's chat template instead (question = user turn, answer = assistant
    # turn, ending with the tokenizer's EOS); ``template`` is then unused.
    chat: bool = False

    @model_validator(mode="after")
    def _one_placeholder(self) -> PromptConfig:
        if self.template.count("{question}") != 1:
            raise ValueError("template must contain {question} exactly once")
        return self


LoraStage = Literal["sft", "reward", "ppo", "dpo", "grpo", "online_dpo"]


class LoraConfig(Section):
    """LoRA adapters (peft) on the trained stages named in ``stages``; ``r: 0`` turns them off.
    Reward and value heads train in full; exports are merged (they load without peft)."""

    r: int = Field(0, ge=0)
    alpha: float = Field(16.0, gt=0.0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"  # peft's name for every linear layer but the head
    stages: list[LoraStage] = Field(default_factory=lambda: ["sft", "reward", "ppo", "dpo", "grpo", "online_dpo"])
    # blocks that get adapters (negative: from the end); empty: every block. Gradients then stop
    # at the lowest adapted block, so the backward pass skips the blocks below it.
    layers: list[int] = Field(default_factory=list)

    def applies(self, stage: LoraStage) -> bool:
        return self.r > 0 and stage in self.stages


class ModelConfig(Section):
    """A pretrained causal LM of any family the Auto classes cover (``name``: hub id or local
    ``save_pretrained`` directory, e.g. a converted GGUF under ``models/pretrained``) or a fresh
    one built from ``config`` (GPTNeoConfig fields; another family with ``model_type``)."""

    name: str | None = None
    config: dict[str, int | float | str | bool | list] = Field(default_factory=dict)
    lora: LoraConfig = LoraConfig()
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights as loaded
    # Trained models recompute each block's activations in backward: ~1/3 more compute, the
    # activation memory of one block instead of all (docs/scaling.md).
    gradient_checkpointing: bool = False


class GGUFConfig(Section):
    """One GGUF checkpoint converted once (stage ``gguf@<name>``) into a float32
    ``save_pretrained`` directory with its tokenizer; point ``model.name`` at ``out``."""

    file: str  # the .gguf file (a DVC dependency), or pkg:<package>/<file> (presets resolve it)
    out: str  # under models/pretrained (the folder the tokenizer and sft stages depend on)
    check_prompt: str = "Question: What is a good first beer to brew at home?\nAnswer:"


class TokenizerConfig(Section):
    out: str = "models/tokenizer"
    vocab_size: int = Field(2048, ge=260)  # byte-level BPE: 256 bytes + specials + merges
    min_frequency: int = Field(2, ge=1)
    eos_token: str = "<|endoftext|>"
    pad_token: str = "<|pad|>"  # distinct from EOS (TRL #1623, #734)


# Lightning's names (a test checks them against its registries). Strategies: data parallel
# (ddp*), sharded (fsdp*, deepspeed_stage_3*: weights, gradients and optimizer state split over
# the processes; GPU only), DeepSpeed ZeRO 1/2 (optimizer state / gradients split).
Strategy = Literal[
    "auto", "single_device", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true",
    "fsdp", "fsdp_cpu_offload", "deepspeed", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_2_offload",
    "deepspeed_stage_3", "deepspeed_stage_3_offload"]
# 32-true: float32. *-mixed: float32 weights, matmuls in 16 bits under autocast (16-mixed needs
# a GPU; bf16-mixed also runs on CPU). *-true: weights in 16 bits too.
Precision = Literal["64-true", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true"]
Accelerator = Literal["auto", "cpu", "gpu", "cuda", "mps"]


class TrainerConfig(Section):
    """Lightning ``Trainer`` settings shared by every training stage (a stage may override).
    ``devices`` counts processes per node; batch sizes in the stage sections are per process."""

    accelerator: Accelerator = "cpu"
    devices: int | str | list[int] = 1
    strategy: Strategy = "auto"
    num_nodes: int = Field(1, ge=1)
    precision: Precision = "32-true"
    deterministic: bool = True
    log_every_n_steps: int = Field(20, ge=1)  # DVCLive costs ~7 ms a call: keep it >= 20


class TrainerOverride(Section):
    """A stage's own ``trainer:`` subsection: set keys replace the shared section's."""

    accelerator: Accelerator | None = None
    devices: int | str | list[int] | None = None
    strategy: Strategy | None = None
    num_nodes: int | None = Field(None, ge=1)
    precision: Precision | None = None
    deterministic: bool | None = None
    log_every_n_steps: int | None = Field(None, ge=1)

    def apply(self, base: TrainerConfig) -> TrainerConfig:
        return base.model_copy(update={k: v for k, v in self.model_dump().items() if v is not None})


class FreezeConfig(Section):
    """The original project's freeze options. A parameter is frozen when its category's flag is
    set, unless it belongs to a block listed in ``layers_not_to_freeze`` (negative = from the end).
    Categories: emb (token/position embeddings), ln (LayerNorms), attn, ff (MLP), other (heads…)."""

    freeze_emb: bool = False
    freeze_ln: bool = False
    freeze_attn: bool = False
    freeze_ff: bool = False
    freeze_other: bool = False
    layers_not_to_freeze: list[int] = Field(default_factory=list)


class EarlyStopConfig(Section):
    enabled: bool = False
    patience: int = Field(3, ge=1)  # validation checks without improvement
    min_delta: float = Field(0.0, ge=0.0)


class OptimConfig(Section):
    """The optimizer and its schedule, one section shape for every trained stage (``<stage>.optim``):
    AdamW (no weight decay on biases and LayerNorms), linear warmup over ``warmup_frac`` of the
    optimizer steps, then linear decay to 0, and gradient-norm clipping."""

    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)  # never on biases and LayerNorms
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.95], min_length=2, max_length=2)
    warmup_frac: float = Field(0.05, ge=0.0, le=1.0)  # linear warmup, then linear decay to 0
    gradient_clip_val: float = Field(1.0, ge=0.0)  # max gradient norm; 0: off


@dataclass(frozen=True)
class Loop:
    """What the Lightning fit loop needs from a stage, in the Trainer's own units: ``max_steps``
    counts optimizer steps, ``val_check_interval`` training batches. Each training module builds
    its own (:meth:`TrainConfig.loop`, ``PPOModule.loop``), so no stage fakes another's config."""

    max_steps: int
    max_epochs: int
    val_check_interval: int
    monitor: str
    monitor_mode: Literal["min", "max"]
    limit_val_batches: int | float = 1.0
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None  # None: Lightning does not clip (manual optimisation clips itself)
    early_stopping: EarlyStopConfig | None = None


class TrainConfig(Section):
    """A supervised training stage (SFT, the reward models): batches, the fit loop, the
    optimizer section, freeze options and the stage's trainer override."""

    seed: int = 0
    batch_size: int = Field(16, ge=1)
    eval_batch_size: int = Field(32, ge=1)
    max_length: int = Field(256, ge=8)
    optim: OptimConfig = OptimConfig()
    max_epochs: int = Field(1, ge=-1)  # -1: bounded by max_steps
    max_steps: int = Field(-1, ge=-1)  # optimizer steps; -1: bounded by max_epochs
    val_check_interval: int = Field(100, ge=1)  # training batches between validations
    limit_val_batches: int | float = 1.0
    accumulate_grad_batches: int = Field(1, ge=1)
    monitor: str = "val_loss"  # the metric that picks the best checkpoint
    monitor_mode: Literal["min", "max"] = "min"
    early_stopping: EarlyStopConfig = EarlyStopConfig()
    freeze: FreezeConfig = FreezeConfig()
    trainer: TrainerOverride = TrainerOverride()  # this stage's changes to the shared `trainer`

    @model_validator(mode="after")
    def _bounded(self) -> TrainConfig:
        if self.max_epochs == -1 and self.max_steps == -1:
            raise ValueError("set max_epochs or max_steps")
        return self

    def loop(self) -> Loop:
        return Loop(max_steps=self.max_steps, max_epochs=self.max_epochs, val_check_interval=self.val_check_interval,
                    monitor=self.monitor, monitor_mode=self.monitor_mode, limit_val_batches=self.limit_val_batches,
                    accumulate_grad_batches=self.accumulate_grad_batches,
                    gradient_clip_val=self.optim.gradient_clip_val or None,
                    early_stopping=self.early_stopping if self.early_stopping.enabled else None)


class SampleConfig(Section):
    """Sampling for generations (KV cache, stops at EOS). top_k 0 and top_p 1 keep log-probs exact."""

    n: int = Field(32, ge=0)
    max_new_tokens: int = Field(96, ge=1)
    temperature: float = Field(1.0, gt=0.0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    batch_size: int = Field(16, ge=1)


class SFTConfig(TrainConfig):
    data: str = "data/prepared"
    out: str = "models/sft"
    metrics: str = "metrics/sft.json"
    live_dir: str = "dvclive/sft"
    checkpoint_dir: str = "checkpoints/sft"
    sample: SampleConfig = SampleConfig()


# --------------------------------------------------------------------------------------------
# reward: two reward models, one DVC foreach stage (reward@regression, reward@classification)
# --------------------------------------------------------------------------------------------
class QuestionHalf(Section):
    """The training questions a stage learns preferences from: all, or one of two disjoint halves
    (by a hash of the question id). A judge trained on one half never saw the other half's
    preferences: train the policy's reward model (and DPO) on half_a and the judge on half_b,
    the honest judge for real data."""

    train_questions: Literal["all", "half_a", "half_b"] = "all"


class RewardKindConfig(TrainConfig, QuestionHalf):
    data: str = "data/prepared"
    init: Literal["sft", "model"] = "sft"  # from the SFT policy (InstructGPT) or model.name/config
    sft_dir: str = "models/sft"
    out: str = "models/reward/kind"
    metrics: str = "metrics/reward_kind.json"
    live_dir: str = "dvclive/reward/kind"
    checkpoint_dir: str = "checkpoints/reward/kind"
    score_batch_size: int = Field(64, ge=1)
    # PPO's score normalisation: mean/std over the first N SFT training answers; null: all of them
    norm_answers: int | None = Field(None, ge=2)


class RegressionConfig(RewardKindConfig):
    """Fits the prepared (scaled) score of each answer."""

    loss: Literal["mse", "mae"] = "mse"


class ClassificationConfig(RewardKindConfig):
    """Bradley-Terry on (chosen, rejected) pairs: -log sigmoid(r_c - r_r - margin_scale * margin)."""

    use_margin: bool = False
    margin_scale: float = Field(1.0, ge=0.0)
    center_coef: float = Field(0.0, ge=0.0)  # + coef * mean((r_c + r_r)^2), keeps rewards centred


class RewardConfig(Section):
    regression: RegressionConfig = RegressionConfig()
    classification: ClassificationConfig = ClassificationConfig()


# --------------------------------------------------------------------------------------------
# ppo: RLHF of the SFT policy against a reward model
# --------------------------------------------------------------------------------------------
class KLConfig(Section):
    """The KL penalty: -beta * KL_t per response token. ``adaptive``: Ziegler et al.'s controller
    moves beta so the per-sequence KL approaches ``target`` (horizon in rollouts)."""

    estimator: Literal["k1", "k3"] = "k1"
    beta: float = Field(0.1, ge=0.0)  # the initial beta when adaptive
    adaptive: bool = True
    target: float = Field(4.0, gt=0.0)  # nats per sequence
    horizon: int = Field(10000, ge=1)


class OnlineRLConfig(Section):
    """What every online-RL stage (PPO, GRPO) shares: prompts, the SFT policy and reward model it
    starts from, rollouts of ``rollout_batch_size`` prompts a process per iteration, minibatch
    updates (``mini_batch_size`` answers an optimizer step, accumulated over micro-batches of
    ``micro_batch_size``), score shaping, the held-out evaluation and the export."""

    data: str = "data/prepared"  # prompts: <data>/train/prompts; held-out: <data>/val/prompts
    sft_dir: str = "models/sft"  # the initial policy and the frozen reference
    reward_model: str = "models/reward/classification"  # an exported reward model directory
    out: str = "models/online"
    metrics: str = "metrics/online.json"
    live_dir: str = "dvclive/online"
    checkpoint_dir: str = "checkpoints/online"
    seed: int = 0
    iterations: int = Field(60, ge=1)
    rollout_batch_size: int = Field(64, ge=1)  # prompts per iteration and process
    mini_batch_size: int = Field(64, ge=1)  # answers per optimizer step
    micro_batch_size: int = Field(64, ge=1)  # answers per forward/backward
    optim: OptimConfig = OptimConfig(lr=1e-5, weight_decay=0.0, warmup_frac=0.0)
    max_prompt_length: int = Field(128, ge=8)  # the question is cut from its end to fit
    max_length: int = Field(256, ge=8)  # the reward model's input: sampled prompt + answer ids fit in it
    sample: SampleConfig = SampleConfig(max_new_tokens=96)
    score_clip: float | None = Field(None, gt=0.0)  # clip normalised scores to +-this; null: off
    missing_eos_penalty: float | None = Field(None, ge=0.0)  # subtracted from scores without EOS
    eval_every: int = Field(10, ge=1)  # iterations between held-out evaluations and checkpoints
    eval_prompts: int = Field(64, ge=1)  # held-out prompts scored at each evaluation
    samples_every: int = Field(20, ge=1)  # iterations between tables of sample generations
    export: Literal["last", "best"] = "last"  # which policy goes to `out` (best: by held-out score)
    freeze: FreezeConfig = FreezeConfig()
    trainer: TrainerOverride = TrainerOverride()

    @property
    def answers_per_iteration(self) -> int:
        """Answers sampled per iteration and process."""
        return self.rollout_batch_size

    @property
    def epochs(self) -> int:
        """Passes over each rollout batch."""
        raise NotImplementedError

    @property
    def updates_per_iteration(self) -> int:
        return self.epochs * self.answers_per_iteration // self.mini_batch_size

    @model_validator(mode="after")
    def _batch_shapes(self) -> OnlineRLConfig:
        if self.answers_per_iteration % self.mini_batch_size:
            raise ValueError("the answers of an iteration (rollout_batch_size, x num_generations for GRPO) "
                             "must be a multiple of mini_batch_size")
        if self.mini_batch_size % self.micro_batch_size:
            raise ValueError("mini_batch_size must be a multiple of micro_batch_size")
        if self.max_prompt_length + self.sample.max_new_tokens > self.max_length:
            raise ValueError("max_prompt_length + sample.max_new_tokens must be <= max_length "
                             "(the reward model scores the sampled prompt and answer ids whole)")
        return self


class PPOConfig(OnlineRLConfig):
    """PPO: rollouts of ``rollout_batch_size`` prompts a process per iteration, then
    ``ppo_epochs`` passes over shuffled minibatches of ``mini_batch_size`` rollouts, each an
    optimizer step over micro-batches of ``micro_batch_size`` (gradient accumulation)."""

    out: str = "models/ppo"
    metrics: str = "metrics/ppo.json"
    live_dir: str = "dvclive/ppo"
    checkpoint_dir: str = "checkpoints/ppo"
    ppo_epochs: int = Field(4, ge=1)
    critic: Literal["shared", "separate"] = "shared"  # value head on the policy, or a critic from the RM
    kl: KLConfig = KLConfig()
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    lam: float = Field(0.95, ge=0.0, le=1.0)
    cliprange: float = Field(0.2, gt=0.0)
    cliprange_value: float = Field(0.2, gt=0.0)
    vf_coef: float = Field(0.1, ge=0.0)

    @property
    def epochs(self) -> int:
        return self.ppo_epochs


class GRPOConfig(OnlineRLConfig):
    """GRPO and its relatives (shared/docs/dpo-grpo-details.md): ``num_generations`` answers to
    each of ``rollout_batch_size`` prompts, group-relative advantages, the clipped ratio
    objective with ``beta`` x k3 KL to the reference in the loss, token-level aggregation (every
    answer token of a minibatch weighs the same: DAPO's, not the per-answer mean)."""

    out: str = "models/grpo"
    metrics: str = "metrics/grpo.json"
    live_dir: str = "dvclive/grpo"
    checkpoint_dir: str = "checkpoints/grpo"
    num_generations: int = Field(8, ge=2)  # answers per prompt (a group)
    grpo_epochs: int = Field(1, ge=1)  # passes over each rollout batch (TRL: num_iterations)
    advantage: Literal["grpo", "rloo"] = "grpo"  # baseline: group mean, or leave-one-out mean
    scale_rewards: Literal["group", "batch", "none"] = "group"  # none: Dr. GRPO
    beta: float = Field(0.04, ge=0.0)  # k3 KL coefficient in the loss (0: KL only logged)
    epsilon: float = Field(0.2, gt=0.0)  # lower clip: ratio >= 1 - epsilon
    epsilon_high: float | None = Field(None, gt=0.0)  # upper clip (DAPO's clip-higher: 0.28); null: epsilon
    mask_truncated_completions: bool = False  # answers without EOS carry no loss (DAPO)

    @property
    def answers_per_iteration(self) -> int:
        return self.rollout_batch_size * self.num_generations

    @property
    def epochs(self) -> int:
        return self.grpo_epochs


class PreferenceLossConfig(Section):
    """DPO's loss, shared by ``dpo`` and ``online_dpo``: DPO (``loss: sigmoid``), IPO (``ipo``:
    mean token log-probs) or conservative DPO (``label_smoothing`` > 0)."""

    beta: float = Field(0.1, gt=0.0)
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)  # cDPO: preferences flipped with this probability

    @model_validator(mode="after")
    def _smoothing_is_dpo(self) -> PreferenceLossConfig:
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError("label_smoothing applies to loss: sigmoid only")
        return self


class OnlineDPOConfig(OnlineRLConfig, PreferenceLossConfig):
    """Online DPO (Guo et al. 2024; iterative DPO, Xiong et al. 2024; TRL's OnlineDPOTrainer):
    each iteration samples ``num_generations`` answers to each of ``rollout_batch_size`` prompts
    from the current policy, the reward model's best and worst answer to a prompt become a pair,
    and the DPO loss (``loss``, ``beta``, ``label_smoothing`` as in ``dpo``) trains on the pairs
    against the frozen SFT reference. Its minibatches count pairs (one per prompt)."""

    out: str = "models/online_dpo"
    metrics: str = "metrics/online_dpo.json"
    live_dir: str = "dvclive/online_dpo"
    checkpoint_dir: str = "checkpoints/online_dpo"
    num_generations: int = Field(4, ge=2)  # answers per prompt; the best and the worst form its pair
    dpo_epochs: int = Field(1, ge=1)  # passes over each iteration's pairs

    @property
    def answers_per_iteration(self) -> int:
        """Pairs per iteration and process (the unit of the minibatches): one per prompt."""
        return self.rollout_batch_size

    @property
    def epochs(self) -> int:
        return self.dpo_epochs


# --------------------------------------------------------------------------------------------
# dpo: offline preference optimisation on the pairs tables
# --------------------------------------------------------------------------------------------
class DPOConfig(TrainConfig, PreferenceLossConfig, QuestionHalf):
    """DPO (``loss: sigmoid``), IPO (``ipo``) or conservative DPO (``label_smoothing`` > 0) on
    the ``pairs`` tables, from the SFT policy with the frozen SFT policy as reference (its
    log-probs computed once, before the fit). Batches count pairs."""

    data: str = "data/prepared"
    sft_dir: str = "models/sft"
    out: str = "models/dpo"
    metrics: str = "metrics/dpo.json"
    live_dir: str = "dvclive/dpo"
    checkpoint_dir: str = "checkpoints/dpo"
    score_batch_size: int = Field(64, ge=1)  # pairs per no-grad forward (reference, test)
    monitor: str = "val_accuracy"  # the best checkpoint by validation preference accuracy
    monitor_mode: Literal["min", "max"] = "max"


# --------------------------------------------------------------------------------------------
# base, evaluate, compare: the policies side by side
# --------------------------------------------------------------------------------------------
class BaseConfig(Section):
    """The untrained base policy (``model.name``, or a fresh ``model.config`` drawn with ``seed``),
    exported like every other policy so the evaluation treats it alike."""

    out: str = "models/base"
    seed: int = 0


class EvaluateConfig(Section):
    """One evaluation per policy (a DVC foreach stage): answers to the test questions, scored by
    every reward model (and the synthetic site's gold quality), BLEU/ROUGE against the reference
    answers, length, EOS rate, and KL to ``reference`` on the policy's own samples."""

    data: str = "data/prepared"  # questions and reference answers: <data>/test/sft
    policies: dict[str, str] = Field(default_factory=lambda: {
        "base": "models/base", "sft": "models/sft", "ppo": "models/ppo", "dpo": "models/dpo", "grpo": "models/grpo",
        "online_dpo": "models/online_dpo"})
    reference: str = "models/sft"
    reward_models: dict[str, str] = Field(default_factory=lambda: {
        "regression": "models/reward/regression", "classification": "models/reward/classification"})
    gold: Literal["auto", "on", "off"] = "auto"  # auto: on when data.source is the embedded default
    out: str = "data/eval"  # <out>/<policy>/generations.parquet
    metrics_dir: str = "metrics"  # <metrics_dir>/eval_<policy>.json
    seed: int = 0
    max_questions: int | None = Field(None, ge=1)  # null: every test question
    max_prompt_length: int = Field(128, ge=8)
    max_length: int = Field(256, ge=8)  # the reward models' input: sampled prompt + answer ids fit in it
    score_batch_size: int = Field(64, ge=1)
    sample: SampleConfig = SampleConfig(max_new_tokens=96, batch_size=64)

    @model_validator(mode="after")
    def _fits_reward_models(self) -> EvaluateConfig:
        if self.max_prompt_length + self.sample.max_new_tokens > self.max_length:
            raise ValueError("max_prompt_length + sample.max_new_tokens must be <= max_length "
                             "(the reward models score the sampled prompt and answer ids whole)")
        return self


class BoNConfig(Section):
    """Best-of-N as a policy, evaluated like every trained one (the test questions and sampling of
    ``evaluate``, every judge): ``n`` answers from ``policy``, the one the reward model
    ``reward_model`` (a key of ``evaluate.reward_models``) scores highest. ``oracle``: also the
    pick by gold (embedded default only): the headroom of reranking with a perfect judge, shown
    in the leaderboard and never counted as a method."""

    policy: str = "models/sft"
    n: int = Field(16, ge=1)
    reward_model: str = "classification"
    oracle: bool = True
    out: str = "data/eval/bon"  # <out>/generations.parquet; <out>/oracle/generations.parquet
    metrics: str = "metrics/eval_bon.json"
    seed: int = 0


class OveroptConfig(Section):
    """Reward over-optimisation curves (Gao et al. 2022) on the online methods' held-out prompts:
    the gold and proxy gain over SFT against sqrt(KL) for each method of ``methods`` (its sample
    tables, one per held-out evaluation: ``eval_every`` sets the points) and for Best-of-N from
    ``policy`` with N = 1, 2, 4, ..., ``pool`` (an unbiased estimate from ``pool`` answers to each
    of the first ``prompts`` held-out prompts), with Gao's forms fitted to each."""

    data: str = "data/prepared"  # held-out prompts: <data>/val/prompts (the online stages' evaluation set)
    methods: dict[str, str] = Field(default_factory=lambda: {"ppo": "ppo", "grpo": "grpo"})  # name -> its section
    policy: str = "models/sft"
    prompts: int = Field(32, ge=1)
    pool: int = Field(64, ge=2)
    metrics: str = "metrics/overopt.json"
    plot: str = "metrics/overopt.csv"
    seed: int = 0


class CompareConfig(Section):
    """The leaderboard: every evaluated policy against ``baseline`` on the same questions, by
    every judge (win rate and mean paired score difference, 95% paired-bootstrap intervals), with
    each policy's KL to the reference, length, EOS rate, and the wall time of the stage that
    trained it (``methods``: policy -> its stage's section in params.yaml)."""

    baseline: str = "sft"
    methods: dict[str, str] = Field(default_factory=lambda: {"sft": "sft", "ppo": "ppo", "dpo": "dpo", "grpo": "grpo",
                                                             "online_dpo": "online_dpo"})
    metrics: str = "metrics/compare.json"
    plot: str = "metrics/compare_win_rate.csv"
    table: str = "metrics/leaderboard.md"  # with wall times: a plain output, not a metric


# Every section of params.yaml and its typed config (presets are checked against all of them);
# beside them the top-level ``seed`` (see :func:`seeded`).
SECTIONS: dict[str, type[Section]] = {
    "synth": SynthConfig, "data": DataConfig, "prompt": PromptConfig, "model": ModelConfig,
    "tokenizer": TokenizerConfig, "trainer": TrainerConfig, "sft": SFTConfig, "reward": RewardConfig,
    "ppo": PPOConfig, "dpo": DPOConfig, "grpo": GRPOConfig, "online_dpo": OnlineDPOConfig, "base": BaseConfig,
    "evaluate": EvaluateConfig, "bon": BoNConfig, "overopt": OveroptConfig, "compare": CompareConfig,
}
TOP_LEVEL = ("seed", "pretrained_dir")  # scalar params outside any section
OPEN_SECTIONS: dict[str, type[Section]] = {"gguf": GGUFConfig}  # entries named by the user, each of this type
