"""One validated schema for a whole run: data, model, train (with DeepSpeed), tune, eval, serve, cluster.

A config comes from YAML files plus ``section.key=value`` overrides. Everything is checked here,
before any Ray work starts: unknown keys, wrong types and impossible values are reported with their
dotted field path and what is allowed (as axolotl does), and the resolved config is saved per stage.
"""

from __future__ import annotations

import copy
import os
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from rayllm.errors import ConfigError


def _absolute(path: str | None) -> str | None:
    """A local path as an absolute one: Ray workers run in other directories than the CLI."""
    if path is None or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


LocalPath = Annotated[str, AfterValidator(_absolute)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


# Marks on fields (``json_schema_extra``) that the stage table and `rayllm run` read.
RESUMABLE = {"resumable": True}  # changes how long or how observably a run trains, not what a step
# computes: a run that changed only such fields continues from its checkpoint (workers reshard)
PER_TRIAL = {"per_trial": True}  # each tune trial sets it itself: not part of what a search is


def has_mark(field: Any, mark: dict[str, bool]) -> bool:
    """Whether a pydantic field carries ``mark`` in its ``json_schema_extra``."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return all(extra.get(k) == v for k, v in mark.items())


def marked(mark: dict[str, bool], model: type[BaseModel] | None = None, prefix: str = "") -> set[str]:
    """Dotted paths of the fields of ``model`` (default: the whole run config) carrying ``mark``."""
    out: set[str] = set()
    for name, field in (model or RunConfig).model_fields.items():
        if has_mark(field, mark):
            out.add(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out |= marked(mark, ann, f"{prefix}{name}.")
    return out


class Strict(BaseModel):
    """Base for every section: unknown keys are errors, not silently ignored typos."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------- data
class SourceConfig(Strict):
    """One input source: a file, directory, glob, ``pkg://package/sub/path`` or pyarrow URI."""

    path: str = Field(
        description="a file, directory, glob, pkg://package/sub/path or pyarrow URI (s3://, gs://, ...); "
        "with format hf, a Hugging Face dataset folder (save_to_disk, or parquet/json/arrow files laid "
        "out as on the Hub) or hf://datasets/<owner>/<name>"
    )
    format: Literal["txt", "jsonl", "parquet", "arrow", "hf"] | None = Field(
        None, description="inferred from the extension when omitted; hf: a Hugging Face dataset (see path)"
    )
    split: str | None = Field(
        None,
        description="format hf: the dataset split to read (default train; a single saved Dataset has none)",
    )
    split_on: Literal["file", "paragraph", "line"] = Field(
        "paragraph", description="txt only: one document per file, blank-line paragraph or line"
    )
    text_field: str = Field(
        "text", description="jsonl key / parquet, arrow or hf column holding the document text"
    )
    id_field: str | None = Field(None, description="jsonl key whose value names the document in messages")
    weight: PositiveFloat = Field(
        1.0, description="repeat factor: 2.0 includes each document twice, 0.5 keeps half"
    )


class CleanConfig(Strict):
    """prep's cleaning: Unicode form, whitespace, length bounds, dedup, stopwords; drops are counted."""

    normalize: Literal["NFC", "NFKC", "NFD", "NFKD", "none"] = Field(
        "NFC", description="Unicode normalization form applied to every document"
    )
    strip_control: bool = Field(
        True, description="remove control characters (tab and newline stay) and zero-width spaces"
    )
    collapse_whitespace: bool = Field(
        True, description="trim trailing spaces and runs of 3+ newlines; indentation is kept (code)"
    )
    min_chars: NonNegInt = Field(1, description="drop documents shorter than this after cleaning")
    max_chars: PositiveInt | None = Field(None, description="drop documents longer than this")
    dedup: Literal["none", "exact", "minhash"] = Field(
        "exact", description="drop exact duplicates (content hash) or near duplicates (MinHash LSH)"
    )
    minhash_threshold: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.8, description="estimated Jaccard similarity of character 5-grams above which two are duplicates"
    )
    stopwords: bool = Field(
        False,
        description="remove stop words; OFF by default because it destroys the text a language "
        "model must learn to produce. Only for classification-style corpora.",
    )
    stopword_language: str = Field("english", description="stop-word list used when stopwords is on")


class TokenizerConfig(Strict):
    """The vocabulary: a byte-level BPE trained on the corpus, or a local tokenizer folder loaded as is."""

    path: LocalPath | None = Field(None, description="load this local tokenizer folder instead of training")
    vocab_size: Annotated[int, Field(ge=260, le=1_000_000)] = Field(
        8192, description="size of the trained byte-level BPE vocabulary (special tokens included)"
    )
    min_frequency: PositiveInt = Field(2, description="a merge must occur this often to be learned")
    sample_docs: PositiveInt = Field(50_000, description="documents used to train the vocabulary")
    eos_token: str = Field("<|endoftext|>", description="trained vocabulary: appended to every document")
    pad_token: str = Field("<|pad|>", description="trained vocabulary: padding token (never trained on)")
    engine: Literal["auto", "tiktoken", "tokenizers"] = Field(
        "auto",
        description="prep's encoder: tiktoken (~4x faster, same ids) where exact for byte-level BPE, "
        "else the tokenizers library; a sample of documents is checked against tokenizers",
    )


class DataConfig(Strict):
    """prep (Ray Data): which text to read, how to clean, dedup, tokenize and pack it into blocks."""

    sources: list[SourceConfig] = Field(default_factory=list, description="the input; see data.sources[]")
    clean: CleanConfig = Field(default_factory=CleanConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    seq_len: Annotated[int, Field(ge=8, le=1_048_576)] = Field(
        256, description="tokens the model sees per sequence; packed blocks hold seq_len + 1"
    )
    val_fraction: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.02, description="share of documents (by content hash, so stable) held out for validation"
    )
    shard_rows: PositiveInt = Field(4096, description="packed blocks per parquet shard")
    buckets: Annotated[int, Field(ge=1, le=1 << 20)] | None = Field(
        None,
        description="documents are grouped by content hash into this many buckets, each deduplicated, "
        "packed and written by one Ray task; the shards depend on this number, never on the cluster. "
        "Default: one per 16 MiB of input times its source's weight (at least 8)",
    )
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="bad input: stop with file and line, or skip and count it"
    )
    invalid_utf8: Literal["fail", "replace", "skip"] = Field(
        "fail", description="a document with invalid UTF-8: stop, replace the bytes with U+FFFD, or skip it"
    )
    tokenize_batch: PositiveInt = Field(2048, description="documents a prep task encodes at a time (memory)")
    keep_doc_boundaries: bool = Field(
        False,
        description="also write position_ids restarting after each EOS: attention stays within each "
        "document, and positions restart with it",
    )
    task: Literal["lm", "sft"] = Field(
        "lm",
        description="lm: plain text, every token a target; sft: jsonl examples ({messages: [...]} or "
        "{prompt, completion}) rendered with the tokenizer's chat template, the loss on the answer only, "
        "packed whole with attention kept within each example (needs data.tokenizer.path)",
    )
    max_docs: PositiveInt | None = Field(None, description="cap on kept documents (quick runs)")

    @model_validator(mode="after")
    def _sft_needs_the_model_tokenizer(self) -> DataConfig:
        if self.task == "sft" and not self.tokenizer.path:
            raise ValueError(
                "data.task=sft needs data.tokenizer.path: the tokenizer (and chat template) of the model "
                "being fine-tuned, e.g. the folder `rayllm import` wrote"
            )
        if self.task == "sft" and self.clean.dedup == "minhash":
            raise ValueError("data.task=sft dedups exact copies only: set data.clean.dedup to exact or none")
        return self


# -------------------------------------------------------------------------------------------- model
class ModelConfig(Strict):
    """The causal LM: a local Hugging Face folder (fine-tuning), or a GPT-2/Llama shape built from scratch."""

    path: LocalPath | None = Field(None, description="local Hugging Face folder; overrides the shape below")
    family: Literal["gpt2", "llama"] = Field(
        "gpt2", description="architecture of a model built from scratch (learned positions / RoPE+SwiGLU)"
    )
    n_layer: PositiveInt = Field(4, description="transformer blocks")
    n_head: PositiveInt = Field(4, description="attention heads")
    n_kv_head: PositiveInt | None = Field(
        None, description="llama: key/value heads (grouped-query attention); default n_head"
    )
    d_model: PositiveInt = Field(256, description="hidden size")
    d_ff: PositiveInt | None = Field(None, description="MLP hidden size; default 4 x d_model (llama 8/3)")
    max_positions: PositiveInt = Field(1024, description="context length the model is built for")
    dropout: Fraction = Field(0.0, description="dropout on embeddings, attention and residuals")
    activation: Literal["default", "gelu", "relu2", "silu"] = Field(
        "default",
        description="MLP activation: the family's own (gpt2 tanh-approximated GELU, as one fused kernel; "
        "llama SwiGLU), or relu2 (squared ReLU, as modded-nanogpt; gated in llama)",
    )
    tie_embeddings: bool = Field(True, description="share the input embedding with the output layer")
    attention: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="attention kernel (flash_attention_2 needs the flash-attn package on GPUs)"
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.path is None and self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        return self


# -------------------------------------------------------------------------------------------- train
class OptimizerConfig(Strict):
    """The optimizer and its settings; Muon updates matrix weights and AdamW the rest."""

    name: Literal["sgd", "adam", "adamw", "adafactor", "muon"] = Field(
        "adamw",
        description="the optimizer; muon: DeepSpeed's Muon (orthogonalized momentum) for the hidden "
        "weight matrices and AdamW for embeddings, output head, biases and norms (as modded-nanogpt)",
    )
    lr: PositiveFloat = Field(
        1e-3, description="peak learning rate (the schedule scales it); with muon, the AdamW part's"
    )
    muon_lr: PositiveFloat = Field(0.02, description="muon: peak learning rate of the Muon part")
    muon_momentum: Annotated[float, Field(ge=0, lt=1)] = Field(0.95, description="muon: Nesterov momentum")
    lr_scaling: Literal["none", "linear", "sqrt"] = Field(
        "none",
        description="scale lr (and muon_lr) with global_batch / reference_batch: linearly (SGD-like) or by "
        "its square root (Adam-like)",
    )
    reference_batch: PositiveInt = Field(16, description="the global batch the learning rates were tuned at")
    weight_decay: Annotated[float, Field(ge=0)] = Field(
        0.1, description="decoupled weight decay (adamw) or L2 (others); never on biases and norms"
    )
    betas: tuple[Fraction, Fraction] = Field((0.9, 0.95), description="adam/adamw moment decay rates")
    eps: PositiveFloat = Field(1e-8, description="adam/adamw denominator epsilon")
    momentum: Annotated[float, Field(ge=0, lt=1)] = Field(0.9, description="sgd momentum")
    fused: bool = Field(
        True,
        description="adam/adamw: torch's fused kernel, one call for all parameters on CPUs and GPUs alike "
        "(on CPU 0.6 ms against 2.7 ms per step for the demo model)",
    )


class ScheduleConfig(Strict):
    """The learning-rate schedule: warmup, then constant, linear, cosine or warmup-stable-decay."""

    warmup_steps: NonNegInt = Field(0, description="steps of linear warmup from ~0 to the peak lr")
    decay: Literal["constant", "linear", "cosine", "wsd"] = Field(
        "cosine",
        description="shape of the decay after warmup, down to min_lr_ratio at max_steps; wsd: stay at the "
        "peak, then decay linearly over the last decay_fraction of the steps",
    )
    min_lr_ratio: Fraction = Field(0.1, description="final learning rate as a fraction of the peak")
    decay_fraction: Annotated[float, Field(gt=0, le=1)] = Field(
        0.2, description="wsd: share of the steps, at the end, spent decaying"
    )


class DeepSpeedConfig(Strict):
    """DeepSpeed ZeRO stage, precision, offload, compile and communication settings of train."""

    zero_stage: Literal[0, 1, 2, 3] = Field(
        2, description="ZeRO partitioning: 1 optimizer state, 2 + gradients, 3 + parameters"
    )
    offload_optimizer: bool = Field(
        False, description="keep optimizer state in CPU memory (DeepSpeedCPUAdam)"
    )
    offload_params: bool = Field(False, description="ZeRO-3: keep parameters in CPU memory between uses")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="training precision; fp16 (loss scaling) needs GPUs"
    )
    activation_checkpointing: bool = Field(
        False, description="recompute block activations in backward: less memory, ~30% more compute"
    )
    compile: bool | None = Field(
        None,
        description="torch.compile each transformer block on its own (regional: short start-up), or the "
        "whole engine under ZeRO-3; default on with GPUs; off on CPU also runs DeepSpeed's own compiled "
        "kernels (Muon's) eagerly",
    )
    overlap_comm: bool | None = Field(
        None, description="overlap gradient reduction with the backward pass; default on with GPUs"
    )
    reduce_bucket_size: PositiveInt | None = Field(
        None, description="elements per gradient-reduction bucket (DeepSpeed's default: 5e8)"
    )
    zero3_prefetch_bucket_size: PositiveInt | None = Field(
        None, description="ZeRO-3: parameter elements fetched ahead of use (DeepSpeed's default: 5e7)"
    )
    zero3_param_persistence_threshold: NonNegInt | None = Field(
        None,
        description="ZeRO-3: parameters smaller than this stay gathered; default: all of them on one "
        "worker (nothing to partition), DeepSpeed's 1e5 otherwise",
    )
    zero3_max_live_parameters: PositiveInt | None = Field(
        None, description="ZeRO-3: gathered parameter elements held at once (DeepSpeed's default: 1e9)"
    )
    extra: dict[str, Any] = Field(
        default_factory=dict, description="merged last into the generated DeepSpeed config"
    )

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DeepSpeedConfig:
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        return self


class LoraConfig(Strict):
    """Low-rank adapters (peft's LoRA) instead of full fine-tuning: the base weights stay frozen, so
    gradients and optimizer state cover only the adapters; the export merges them into the weights."""

    r: NonNegInt = Field(0, description="adapter rank; 0: off (every weight trains)")
    alpha: PositiveFloat = Field(16.0, description="adapter scale numerator (the update is alpha / r)")
    dropout: Annotated[float, Field(ge=0, lt=1)] = Field(0.0, description="dropout on the adapter input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="module names that get adapters (e.g. [q_proj, v_proj]); all-linear: every linear "
        "layer but the output head",
    )

    def peft(self) -> Any:
        from peft import LoraConfig as PeftLoraConfig

        return PeftLoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=self.target_modules
        )


class TrainConfig(Strict):
    """train (Ray Train + DeepSpeed): workers, batch, steps, checkpoints, recovery and export."""

    data_dir: str | None = Field(None, description="packed data; default: <run_dir>/prep")
    storage: str | None = Field(
        None,
        description="where Ray Train keeps checkpoints: a path every node shares or a pyarrow URI "
        "(s3://, gs://, hdfs://); default: <run_dir>/train/ray",
        json_schema_extra=RESUMABLE | PER_TRIAL,
    )
    workers: PositiveInt | tuple[PositiveInt, PositiveInt] = Field(
        2,
        description="fixed count, or [min, max] for elastic training",
        json_schema_extra=RESUMABLE,
    )
    use_gpu: bool = Field(False, description="one GPU per worker (gpus_per_worker), NCCL between them")
    cpus_per_worker: PositiveFloat = Field(
        0.5,
        description="fractional on CPU so Ray Data read tasks keep a core",
        json_schema_extra=RESUMABLE,
    )
    gpus_per_worker: Annotated[float, Field(ge=0)] = Field(
        1.0, description="GPUs per worker with use_gpu", json_schema_extra=RESUMABLE
    )
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="extra custom Ray resources per worker, e.g. a node slot",
        json_schema_extra=RESUMABLE,
    )
    elastic_monitor_s: PositiveFloat = Field(
        60.0,
        description="elastic ranges: how often Ray Train checks for capacity to scale back up",
        json_schema_extra=RESUMABLE,
    )
    max_steps: PositiveInt = Field(
        300,
        description="optimizer steps of the run (a resumed run continues to it)",
        json_schema_extra=RESUMABLE | PER_TRIAL,
    )
    stop_at: PositiveInt | None = Field(
        None,
        description="end this launch at this step, with a checkpoint, short of max_steps and on its "
        "learning-rate schedule (tune trains a trial rung by rung so); null: at max_steps",
        json_schema_extra=PER_TRIAL,
    )
    global_batch: PositiveInt = Field(16, description="sequences per optimizer step, all workers")
    micro_batch: PositiveInt | Literal["auto"] = Field(
        8,
        description="sequences per forward pass on one worker; auto: the largest that fits in memory "
        "(GPUs: probed; CPUs: estimated), the same on every worker",
    )
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    loss: Literal["auto", "full", "chunked", "liger"] = Field(
        "auto",
        description="next-token loss: full logits, chunked over positions (never materializes them), "
        "Liger Kernel's fused kernel (CUDA); auto: liger on CUDA when installed, else chunked",
    )
    grad_clip: Annotated[float, Field(ge=0)] = Field(1.0, description="clip the global gradient norm; 0: off")
    log_every: PositiveInt = Field(
        10, description="steps between train-metric lines (loss, tokens/s, MFU)", json_schema_extra=RESUMABLE
    )
    eval_every: PositiveInt = Field(
        100, description="steps between validation passes", json_schema_extra=RESUMABLE
    )
    eval_at: list[PositiveInt] = Field(
        default_factory=list,
        description="more steps to validate at, besides every eval_every (tune adds ASHA's rungs, so "
        "that each rung decides on a fresh validation)",
        json_schema_extra=RESUMABLE,
    )
    eval_batches: PositiveInt = Field(
        8, description="global batches of the val split each validation scores", json_schema_extra=RESUMABLE
    )
    checkpoint_every: PositiveInt = Field(
        100, description="steps between checkpoints (and the last step)", json_schema_extra=RESUMABLE
    )
    keep_checkpoints: PositiveInt = Field(
        2, description="newest checkpoints kept in storage", json_schema_extra=RESUMABLE
    )
    max_failures: NonNegInt = Field(
        3,
        description="worker-group restarts from the last checkpoint before the run fails",
        json_schema_extra=RESUMABLE,
    )
    collective_timeout_s: PositiveInt = Field(
        1800,
        description="a collective (all-reduce, barrier) waiting longer fails the step, so Ray Train "
        "restarts the workers from the last checkpoint instead of hanging",
        json_schema_extra=RESUMABLE,
    )
    shuffle_buffer: NonNegInt = Field(0, description="rows in the per-epoch local shuffle buffer")
    cache_data_gb: Annotated[float, Field(ge=0)] = Field(
        2.0,
        description="packed data smaller than this is materialized once in the object store (fast "
        "epochs and restarts); larger data streams from storage",
    )
    seed: int = Field(0, description="seed of initialization, dropout and the shuffle buffer")
    export: bool = Field(
        True,
        description="write <run_dir>/train/export, a plain Hugging Face folder",
        json_schema_extra=RESUMABLE | PER_TRIAL,
    )
    resume: bool = Field(
        True,
        description="continue from the last checkpoint in the run dir",
        json_schema_extra=RESUMABLE | PER_TRIAL,
    )

    @field_validator("workers")
    @classmethod
    def _range_ordered(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        if isinstance(v, tuple) and v[0] > v[1]:
            raise ValueError(f"elastic range [min, max] needs min <= max, got [{v[0]}, {v[1]}]")
        return v

    @model_validator(mode="after")
    def _stop_within_run(self) -> TrainConfig:
        if self.stop_at is not None and self.stop_at > self.max_steps:
            raise ValueError(f"stop_at={self.stop_at} is past the run's max_steps={self.max_steps}")
        return self

    @property
    def end_step(self) -> int:
        """The step this launch ends at: ``stop_at``, else ``max_steps``."""
        return self.stop_at or self.max_steps

    @model_validator(mode="after")
    def _lora_with_one_optimizer(self) -> TrainConfig:
        if self.lora.r and self.optimizer.name == "muon":
            raise ValueError("train.lora needs an adam/adamw/sgd/adafactor optimizer, not muon")
        if self.lora.r and self.deepspeed.zero_stage == 3:
            raise ValueError("train.lora works with deepspeed.zero_stage 0-2 (adapters are small)")
        return self

    @property
    def worker_range(self) -> tuple[int, int]:
        return (self.workers, self.workers) if isinstance(self.workers, int) else self.workers

    def grad_accum(self, world: int) -> int:
        assert isinstance(self.micro_batch, int), "resolve micro_batch=auto first"
        return self.global_batch // (self.micro_batch * world)

    @model_validator(mode="after")
    def _offload_optimizer_is_adam(self) -> TrainConfig:
        if self.deepspeed.offload_optimizer and self.optimizer.name not in ("adam", "adamw"):  # muon too
            raise ValueError(
                f"deepspeed.offload_optimizer runs DeepSpeedCPUAdam; optimizer.name={self.optimizer.name!r} "
                "must be adam or adamw with offload"
            )
        return self

    @model_validator(mode="after")
    def _batch_arithmetic(self) -> TrainConfig:
        lo, hi = self.worker_range
        micro = 1 if self.micro_batch == "auto" else self.micro_batch  # auto picks a divisor
        for w in range(lo, hi + 1):
            if self.global_batch % (micro * w):
                raise ValueError(
                    f"global_batch={self.global_batch} is not divisible by micro_batch x workers = "
                    f"{micro} x {w} = {micro * w}; pick a global_batch that is a "
                    f"multiple of it (for elastic ranges, of every worker count in [{lo}, {hi}])"
                )
        return self


# --------------------------------------------------------------------------------------------- tune
class TuneConfig(Strict):
    """tune (Ray Tune): the search space, search algorithm, scheduler and each trial's budget."""

    search: Literal["random", "optuna"] = Field(
        "random",
        description="random: lists are grids, the rest sampled; optuna: Optuna's TPE proposes points",
    )
    num_samples: PositiveInt | None = Field(
        None,
        description="trials (each grid point this many times); default 1 for a space of only lists, else 8",
    )
    scheduler: Literal["asha", "fifo"] = Field(
        "asha",
        description="asha: every trial trains to the first rung, and the best 1/reduction_factor of a "
        "rung go on to the next (ASHA's promotions, Li et al. 2020); fifo: every trial to max_steps",
    )
    metric: Literal["val_loss", "val_perplexity", "val_accuracy", "train_loss"] = Field(
        "val_loss", description="what trials are ranked by: the last value each trial reported"
    )
    mode: Literal["min", "max"] | None = Field(
        None, description="whether a lower or higher metric is better; default max for val_accuracy, else min"
    )
    max_steps: PositiveInt = Field(100, description="train.max_steps of each trial")
    grace_period: PositiveInt | None = Field(
        None,
        description="asha: steps every trial runs before it can be left behind (the first rung); default: "
        "the trials' warmup_steps, at least max_steps / reduction_factor^2 (a trial still warming up "
        "is judged by how fast its learning rate ramps, not by where it is going)",
    )
    reduction_factor: Annotated[int, Field(ge=2)] = Field(
        3, description="asha: promote 1 of this many trials at each rung; rungs are this factor apart"
    )
    max_concurrent: PositiveInt | None = Field(
        None, description="trials running at once; default: as many as the cluster's CPUs (GPUs) hold"
    )
    grid_order: Literal["shuffled", "listed"] = Field(
        "shuffled",
        description="the order grid points run in: shuffled (by tune.seed), so that ASHA's rungs meet "
        "a fair sample of the grid rather than a sorted sweep; listed: as written",
    )
    seed: int = Field(0, description="seeds the grid's shuffled order, random sampling and Optuna")
    space: dict[str, Any] = Field(
        default_factory=dict,
        description="config field -> values: a list (every value: a grid), {choice: [...]} (sampled), "
        "{grid: [...]}, {uniform|loguniform|randint: [low, high]}",
    )

    @model_validator(mode="after")
    def _mode(self) -> TuneConfig:
        if self.mode is None:
            self.mode = "max" if self.metric == "val_accuracy" else "min"
        return self

    @model_validator(mode="after")
    def _grace_within_trial(self) -> TuneConfig:
        if self.grace_period is not None and self.grace_period > self.max_steps:
            raise ValueError(
                f"grace_period={self.grace_period} is longer than a trial (max_steps={self.max_steps})"
            )
        return self


# --------------------------------------------------------------------------------------------- eval
class EvalTaskConfig(Strict):
    """One downstream task: a jsonl file of {prompt, completion} examples, scored by its kind."""

    name: str = Field(description="the task's name in the summary and the predictions folder")
    file: LocalPath = Field(
        description="jsonl: prompt, completion (the reference); answers (qa); tests (code)"
    )
    kind: Literal["translation", "summarization", "qa", "classification", "code"] = Field(
        description="translation: BLEU, chrF; summarization: ROUGE-1/2/L; qa: exact match, F1; "
        "classification: accuracy, precision, recall, F1; code: pass@k of the tests"
    )
    target_lang: str = Field(
        "", description="translation: the target language (zh: BLEU's Chinese tokenizer)"
    )
    max_new_tokens: PositiveInt = Field(64, description="the longest answer generated")
    samples: PositiveInt = Field(1, description="answers per prompt (code: for pass@k); 1 is greedy")
    temperature: Annotated[float, Field(ge=0, le=2)] = Field(
        0.8, description="sampling temperature with samples > 1"
    )
    k: list[PositiveInt] = Field(
        default_factory=lambda: [1], description="code: the k of pass@k (each <= samples)"
    )
    max_examples: PositiveInt | None = Field(None, description="score only the file's first examples")
    timeout_s: PositiveFloat = Field(5.0, description="code: seconds a candidate's tests may run")
    memory_mb: PositiveInt = Field(512, description="code: memory a candidate's process may use")

    @model_validator(mode="after")
    def _sampling(self) -> EvalTaskConfig:
        if self.samples > 1 and self.temperature == 0:
            raise ValueError(f"samples={self.samples} needs temperature > 0: greedy answers are all the same")
        if too_big := [k for k in self.k if k > self.samples]:
            raise ValueError(f"k={too_big} is more than samples={self.samples}: pass@k needs k answers")
        return self


class EvalConfig(Strict):
    """eval (Ray Data): perplexity on the validation split and the downstream tasks' metrics."""

    model_dir: LocalPath | None = Field(None, description="default: the run's exported model")
    batch_size: PositiveInt = Field(
        8,
        description="packed blocks per scoring forward pass; prompts per batch handed to a generating "
        "actor's vLLM engine (which runs several batches at once)",
    )
    max_batches: PositiveInt | None = Field(None, description="score only the split's first batches")
    actors: PositiveInt = Field(
        1,
        description="Ray Data actors that score the split, and vLLM engines (Ray Data LLM) that "
        "generate the tasks' answers (each loads the model once)",
    )
    cpus_per_actor: PositiveFloat = Field(1.0, description="CPUs each scoring or generating actor reserves")
    gpus_per_actor: Annotated[float, Field(ge=0)] = Field(
        0.0,
        description="GPUs each scoring actor reserves; > 0 scores and generates on GPUs (a generating "
        "engine takes int(gpus_per_actor) GPUs, at least 1, as tensor-parallel ranks)",
    )
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="scoring and generating precision; auto: bf16 on GPUs, fp32 on CPUs"
    )
    kv_cache_gb: PositiveFloat | None = Field(
        None,
        description="memory for each generating engine's KV cache; default: 1 GiB on CPUs, on GPUs "
        "what vLLM's gpu_memory_utilization leaves",
    )
    lm: bool = Field(
        True, description="score loss and perplexity on the validation split (when there is one)"
    )
    tasks: list[EvalTaskConfig] = Field(
        default_factory=list, description="downstream tasks; see eval.tasks[]"
    )
    endpoint: str | None = Field(
        None,
        description="answer the tasks with a served model's OpenAI-compatible API at this base URL "
        "(e.g. http://127.0.0.1:8000/v1; key from $OPENAI_API_KEY) instead of the exported model",
    )
    endpoint_model: str | None = Field(
        None, description="the model id to ask the endpoint for; default its first"
    )

    @model_validator(mode="after")
    def _unique_names(self) -> EvalConfig:
        names = [t.name for t in self.tasks]
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"tasks: names must be unique (each writes eval/<name>/), {twice} repeat")
        return self

    @model_validator(mode="after")
    def _k_within_samples(self) -> EvalConfig:
        for t in self.tasks:
            if t.kind == "code" and max(t.k) > t.samples:
                raise ValueError(
                    f"tasks[{t.name}]: pass@{max(t.k)} needs samples >= {max(t.k)}, got {t.samples}"
                )
        return self


# -------------------------------------------------------------------------------------------- serve
class ReplicaConfig(Strict):
    """Ray Serve autoscaling: how many replicas, and when to add or remove one."""

    min: NonNegInt = Field(1, description="replicas kept running (autoscaling floor)")
    max: PositiveInt = Field(1, description="autoscaling ceiling")
    target_ongoing_requests: PositiveFloat = Field(
        8.0, description="autoscaling aims at this many requests in flight per replica"
    )
    upscale_delay_s: Annotated[float, Field(ge=0)] = Field(
        30.0, description="load must stay above the target this long before a replica is added"
    )
    downscale_delay_s: Annotated[float, Field(ge=0)] = Field(
        600.0, description="load must stay below the target this long before a replica is removed"
    )

    @model_validator(mode="after")
    def _ordered(self) -> ReplicaConfig:
        if self.min > self.max:
            raise ValueError(f"min={self.min} is greater than max={self.max}")
        return self


class ServeConfig(Strict):
    """serve (Ray Serve LLM over vLLM): the OpenAI-compatible HTTP server, its engine, limits and keys."""

    model_dir: LocalPath | None = Field(None, description="default: the run's exported model")
    model_name: str | None = Field(None, description="id clients send; default: the folder name")
    host: str = Field("127.0.0.1", description="address the HTTP proxy binds")
    port: Annotated[int, Field(ge=1, le=65535)] = Field(8000, description="HTTP port")
    replicas: ReplicaConfig = Field(default_factory=ReplicaConfig)
    cpus_per_replica: PositiveFloat = Field(1.0, description="CPUs each replica reserves")
    gpus_per_replica: Annotated[float, Field(ge=0)] = Field(0.0, description="GPUs each replica reserves")
    max_batch: PositiveInt = Field(
        16, description="sequences one replica's vLLM engine runs together (its max_num_seqs)"
    )
    max_queue: NonNegInt = Field(
        64,
        description="requests waiting for a slot per replica; past max_batch + max_queue requests in "
        "flight on a replica, HTTP 429 + Retry-After",
    )
    max_model_len: PositiveInt | None = Field(
        None, description="longest prompt plus completion in tokens; default: the model's context"
    )
    enforce_eager: bool | None = Field(
        None,
        description="run vLLM without compiled graphs; default: eager on CPUs (compiling costs 1-2 "
        "minutes a replica start there), CUDA graphs on GPUs",
    )
    kv_cache_gb: PositiveFloat | None = Field(
        None,
        description="memory for vLLM's KV cache per replica; default: 1 GiB on CPUs, on GPUs what "
        "vLLM's gpu_memory_utilization leaves",
    )
    stream_interval: PositiveInt = Field(
        4,
        description="tokens per streamed chunk after the first, which goes at once (vLLM's "
        "stream_interval; 1: every token alone, about 13% fewer tokens/s on 2 CPU cores)",
    )
    request_timeout_s: PositiveFloat = Field(
        300.0, description="a request still generating after this long is cut off (504, or an error event)"
    )
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="bearer tokens a client must send (Authorization: Bearer KEY); configs rayllm "
        "saves leave them out",
    )
    api_keys_file: str | None = Field(
        None, description="a file with one API key per line (default: the file $RAYLLM_API_KEYS_FILE names)"
    )
    allow_unauthenticated: bool = Field(
        False, description="serve on a non-loopback host without API keys (anyone reaching it can use it)"
    )
    max_n: PositiveInt = Field(
        16, description="the largest n (choices) one request may ask for; never more than max_batch"
    )
    max_tokens_limit: PositiveInt = Field(1024, description="the largest max_tokens a request may ask for")
    default_max_tokens: PositiveInt = Field(64, description="max_tokens when a request leaves it out")
    max_body_bytes: PositiveInt = Field(1_000_000, description="larger request bodies get HTTP 413")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="weights' precision; auto: the model's own on GPUs, fp32 on CPUs"
    )

    @field_validator("api_keys")
    @classmethod
    def _real_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        for k in keys:
            if not k.get_secret_value().strip() or set(k.get_secret_value()) == {"*"}:
                raise ValueError(
                    "an API key is empty or redacted (a saved config shows keys as ****); "
                    "give the real key, or use serve.api_keys_file"
                )
        return keys


# ----------------------------------------------------------------------------------------- tracking
class MlflowConfig(Strict):
    """An MLflow tracking server (or a local store) that train, tune and eval log to."""

    uri: str = Field(
        description="tracking URI: a server (http://127.0.0.1:5000), a folder or sqlite:///file.db"
    )
    experiment: str = Field("rayllm", description="the experiment the runs are logged under")
    log_model: bool = Field(False, description="also upload the exported model folder as an artifact")


class WandbConfig(Strict):
    """A Weights & Biases project that train, tune and eval log to."""

    project: str = Field(description="the W&B project")
    entity: str | None = Field(None, description="the W&B team or user; default: the API key's")
    mode: Literal["online", "offline"] = Field(
        "online", description="online: to the W&B server (needs WANDB_API_KEY); offline: to disk only"
    )
    dir: str | None = Field(
        None, description="W&B writes its run folders under <dir>/wandb/; default: the run dir"
    )


class TrackingConfig(Strict):
    """Experiment trackers (off unless configured): the resolved config as params, every logged
    step's metrics at their step, tune's trials nested under the search, eval's scores on the run
    it evaluated; logged by the driver from the run's own files, never by the workers."""

    mlflow: MlflowConfig | None = Field(None, description="log to MLflow; see tracking.mlflow.*")
    wandb: WandbConfig | None = Field(None, description="log to Weights & Biases; see tracking.wandb.*")


# ------------------------------------------------------------------------------------------ cluster
class ClusterConfig(Strict):
    """The Ray cluster every stage runs on: join one by address, or start a local one."""

    address: str | None = Field(
        None,
        description="Ray cluster to join; default: $RAY_ADDRESS, else a head running on this machine, "
        "else a new local cluster; local: always a new private local cluster",
    )
    num_cpus: PositiveInt | None = Field(None, description="local cluster only; default: all cores")
    object_store_gb: PositiveFloat | None = Field(None, description="local cluster only")
    dashboard: bool = Field(True, description="local cluster only: start Ray's dashboard (Jobs API, state)")
    verbose: bool = Field(False, description="Ray's own INFO logs and worker output on the console")
    env_vars: dict[str, str] = Field(
        default_factory=dict, description="environment of every Ray worker (over rayllm's defaults)"
    )
    working_dir: str | None = Field(None, description="joining a cluster: upload this folder as working_dir")


class RunConfig(Strict):
    """A whole run: the run directory and one section per stage, validated before anything starts."""

    run_dir: str = Field("runs/default", description="folder every stage writes <run_dir>/<stage>/ into")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _cross_section(self) -> RunConfig:
        if self.model.path is None and self.data.seq_len > self.model.max_positions:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_positions="
                f"{self.model.max_positions}; lower data.seq_len or raise model.max_positions"
            )
        if self.train.deepspeed.precision == "fp16" and not self.train.use_gpu:
            raise ValueError(
                "train.deepspeed.precision=fp16 needs train.use_gpu=true; use fp32 or bf16 on CPU"
            )
        return self

    def dump(self) -> dict[str, Any]:
        """The config as plain data, secrets included: for rayllm's own round trips (workers, trials)."""
        out = self.model_dump(mode="json")
        out["serve"]["api_keys"] = [k.get_secret_value() for k in self.serve.api_keys]
        return out

    def public(self) -> dict[str, Any]:
        """The config as plain data without the API keys: what is written to files. A saved config
        then serves without keys, which a non-loopback host refuses (see serve.api_keys)."""
        out = self.model_dump(mode="json")
        out["serve"]["api_keys"] = []
        return out


# ---------------------------------------------------------------------------------------- loading
def _format_errors(err: ValidationError, origin: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "literal_error":
            msg = f"got {e['input']!r}; {msg.lower()}"
        elif "input" in e and e["type"] != "missing" and not isinstance(e["input"], dict | BaseModel):
            msg = f"{msg} (got {e['input']!r})"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"invalid config{origin}: " + "; ".join(parts)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``train.optimizer.lr=3e-4`` -> (["train", "optimizer", "lr"], 0.0003); values parse as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            if node.get(part) is None:  # a section not given yet, or an optional one left unset
                node[part] = {}
            nxt = node[part]
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {part} is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return out


def load_config(
    paths: list[str | Path] | None = None,
    overrides: list[str] | None = None,
    run_dir: str | None = None,
) -> RunConfig:
    """Merge YAML files (later wins, deeply), apply ``--set`` overrides, then validate."""
    raw: dict[str, Any] = {}
    for p in paths or []:
        p = Path(p)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping of sections")
        raw = deep_merge(raw, loaded)
    raw = apply_overrides(raw, overrides or [])
    if run_dir is not None:
        raw["run_dir"] = run_dir
    return validate_config(raw, origin=", ".join(str(p) for p in paths or []))


def validate_config(raw: dict[str, Any], origin: str = "") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, f" ({origin})" if origin else "")) from None


def deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``b`` over ``a``, recursing into mappings (YAML files, DeepSpeed ``extra``)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _type_name(ann: Any) -> str:
    origin, args = get_origin(ann), get_args(ann)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin in (list, tuple, dict):
        inner = ", ".join(_type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    return "none" if ann is type(None) else getattr(ann, "__name__", str(ann))


def reference_markdown() -> str:
    """The config reference in docs/config.md: generated from the schema so that the two never drift."""
    lines: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        rows = []
        nested = []
        for name, field in model.model_fields.items():
            ann = field.annotation
            sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
            if sub is None:
                args = getattr(ann, "__args__", ())
                subs = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
                sub = subs[0] if subs else None
            listed = get_origin(ann) is list  # a list of sections: a row here, its fields below
            if sub is not None and not listed:
                nested.append((f"{prefix}{name}.", sub))
                continue
            if listed and sub is not None:
                nested.append((f"{prefix}{name}[].", sub))
            default = "[]" if listed else field.get_default(call_default_factory=True)
            default = "required" if field.is_required() else default
            notes = field.description or ""
            if has_mark(field, RESUMABLE):
                notes += " *(resumable: changing it continues a run from its checkpoint)*"
            rows.append(f"| `{prefix}{name}` | {_type_name(ann)} | `{default}` | {notes} |")
        if rows:
            doc = " ".join((model.__doc__ or "").split())
            lines.extend(
                [
                    f"\n**{prefix.rstrip('.') or 'top level'}**: {doc}\n",
                    "| key | type | default | notes |",
                    "|---|---|---|---|",
                    *rows,
                ]
            )
        for sub_prefix, sub in nested:
            walk(sub, sub_prefix)

    walk(RunConfig, "")
    return "\n".join(lines).strip() + "\n"
