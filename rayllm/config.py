"""One validated schema for a whole run: data, model, train (with DeepSpeed), tune, eval, serve, cluster.

A config comes from YAML files plus ``section.key=value`` overrides. Everything is checked here,
before any Ray work starts: unknown keys, wrong types and impossible values are reported with their
dotted field path and what is allowed (as axolotl does), and the resolved config is saved per stage.
"""

from __future__ import annotations

import copy
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from rayllm.errors import ConfigError

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class Strict(BaseModel):
    """Base for every section: unknown keys are errors, not silently ignored typos."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------- data
class SourceConfig(Strict):
    """One input source: a file, directory, glob, ``pkg://package/sub/path`` or pyarrow URI."""

    path: str
    format: Literal["txt", "jsonl", "parquet"] | None = Field(
        None, description="inferred from the extension when omitted"
    )
    split_on: Literal["file", "paragraph", "line"] = Field(
        "paragraph", description="txt only: one document per file, blank-line paragraph or line"
    )
    text_field: str = "text"
    id_field: str | None = None
    weight: PositiveFloat = Field(
        1.0, description="repeat factor: 2.0 includes each document twice, 0.5 keeps half"
    )


class CleanConfig(Strict):
    normalize: Literal["NFC", "NFKC", "NFD", "NFKD", "none"] = "NFC"
    strip_control: bool = True
    collapse_whitespace: bool = True
    min_chars: NonNegInt = 1
    max_chars: PositiveInt | None = None
    dedup: Literal["none", "exact", "minhash"] = "exact"
    minhash_threshold: Annotated[float, Field(gt=0, lt=1)] = 0.8
    stopwords: bool = Field(
        False,
        description="remove stop words; OFF by default because it destroys the text a language "
        "model must learn to produce. Only for classification-style corpora.",
    )
    stopword_language: str = "english"


class TokenizerConfig(Strict):
    path: str | None = Field(None, description="load this local tokenizer folder instead of training")
    vocab_size: Annotated[int, Field(ge=260, le=1_000_000)] = 8192
    min_frequency: PositiveInt = 2
    sample_docs: PositiveInt = Field(50_000, description="documents used to train the vocabulary")
    eos_token: str = "<|endoftext|>"
    pad_token: str = "<|pad|>"
    engine: Literal["auto", "tiktoken", "tokenizers"] = Field(
        "auto",
        description="prep's encoder: tiktoken (~4x faster, same ids) where exact for byte-level BPE, "
        "else the tokenizers library; a sample of documents is checked against tokenizers",
    )


class DataConfig(Strict):
    sources: list[SourceConfig] = Field(default_factory=list)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    seq_len: Annotated[int, Field(ge=8, le=1_048_576)] = 256
    val_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.02
    shard_rows: PositiveInt = Field(4096, description="packed blocks per parquet shard")
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="bad input: stop with file and line, or skip and count it"
    )
    invalid_utf8: Literal["fail", "replace", "skip"] = "fail"
    tokenize_batch: PositiveInt = Field(2048, description="documents a prep task encodes at a time (memory)")
    keep_doc_boundaries: bool = Field(
        False, description="also write position_ids restarting after each EOS (document-masked attention)"
    )
    max_docs: PositiveInt | None = Field(None, description="cap on kept documents (quick runs)")


# -------------------------------------------------------------------------------------------- model
class ModelConfig(Strict):
    path: str | None = Field(None, description="local Hugging Face folder; overrides the shape below")
    family: Literal["gpt2", "llama"] = "gpt2"
    n_layer: PositiveInt = 4
    n_head: PositiveInt = 4
    n_kv_head: PositiveInt | None = None
    d_model: PositiveInt = 256
    d_ff: PositiveInt | None = None
    max_positions: PositiveInt = 1024
    dropout: Fraction = 0.0
    tie_embeddings: bool = True
    attention: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.path is None and self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        return self


# -------------------------------------------------------------------------------------------- train
class OptimizerConfig(Strict):
    name: Literal["sgd", "adam", "adamw", "adafactor"] = "adamw"
    lr: PositiveFloat = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.1
    betas: tuple[Fraction, Fraction] = (0.9, 0.95)
    eps: PositiveFloat = 1e-8
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9


class ScheduleConfig(Strict):
    warmup_steps: NonNegInt = 0
    decay: Literal["constant", "linear", "cosine"] = "cosine"
    min_lr_ratio: Fraction = 0.1


class DeepSpeedConfig(Strict):
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    activation_checkpointing: bool = False
    compile: bool = False
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


class TrainConfig(Strict):
    data_dir: str | None = Field(None, description="packed data; default: <run_dir>/prep")
    storage: str | None = Field(
        None,
        description="where Ray Train keeps checkpoints: a path every node shares or a pyarrow URI "
        "(s3://, gs://, hdfs://); default: <run_dir>/train/ray",
    )
    workers: PositiveInt | tuple[PositiveInt, PositiveInt] = Field(
        2, description="fixed count, or [min, max] for elastic training"
    )
    use_gpu: bool = False
    cpus_per_worker: PositiveFloat = Field(
        0.5, description="fractional on CPU so Ray Data read tasks keep a core"
    )
    gpus_per_worker: Annotated[float, Field(ge=0)] = 1.0
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="extra custom Ray resources per worker, e.g. a node slot"
    )
    elastic_monitor_s: PositiveFloat = Field(
        60.0, description="elastic ranges: how often Ray Train checks for capacity to scale back up"
    )
    max_steps: PositiveInt = 300
    global_batch: PositiveInt = Field(16, description="sequences per optimizer step, all workers")
    micro_batch: PositiveInt = Field(8, description="sequences per forward pass on one worker")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    grad_clip: Annotated[float, Field(ge=0)] = 1.0
    log_every: PositiveInt = 10
    eval_every: PositiveInt = 100
    eval_batches: PositiveInt = 8
    checkpoint_every: PositiveInt = 100
    keep_checkpoints: PositiveInt = 2
    max_failures: NonNegInt = 3
    shuffle_buffer: NonNegInt = Field(0, description="rows in the per-epoch local shuffle buffer")
    cache_data_gb: Annotated[float, Field(ge=0)] = Field(
        2.0,
        description="packed data smaller than this is materialized once in the object store (fast "
        "epochs and restarts); larger data streams from storage",
    )
    seed: int = 0
    export: bool = True
    resume: bool = Field(True, description="continue from the last checkpoint in the run dir")

    @field_validator("workers")
    @classmethod
    def _range_ordered(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        if isinstance(v, tuple) and v[0] > v[1]:
            raise ValueError(f"elastic range [min, max] needs min <= max, got [{v[0]}, {v[1]}]")
        return v

    @property
    def worker_range(self) -> tuple[int, int]:
        return (self.workers, self.workers) if isinstance(self.workers, int) else self.workers

    def grad_accum(self, world: int) -> int:
        return self.global_batch // (self.micro_batch * world)

    @model_validator(mode="after")
    def _offload_optimizer_is_adam(self) -> TrainConfig:
        if self.deepspeed.offload_optimizer and self.optimizer.name not in ("adam", "adamw"):
            raise ValueError(
                f"deepspeed.offload_optimizer runs DeepSpeedCPUAdam; optimizer.name={self.optimizer.name!r} "
                "must be adam or adamw with offload"
            )
        return self

    @model_validator(mode="after")
    def _batch_arithmetic(self) -> TrainConfig:
        lo, hi = self.worker_range
        for w in range(lo, hi + 1):
            if self.global_batch % (self.micro_batch * w):
                raise ValueError(
                    f"global_batch={self.global_batch} is not divisible by micro_batch x workers = "
                    f"{self.micro_batch} x {w} = {self.micro_batch * w}; pick a global_batch that is a "
                    f"multiple of it (for elastic ranges, of every worker count in [{lo}, {hi}])"
                )
        return self


# --------------------------------------------------------------------------------------------- tune
class TuneConfig(Strict):
    num_samples: PositiveInt = 4
    scheduler: Literal["asha", "fifo"] = "asha"
    metric: Literal["val_loss", "train_loss", "val_perplexity"] = "val_loss"
    mode: Literal["min", "max"] = "min"
    max_steps: PositiveInt = 100
    grace_period: PositiveInt = 2
    reduction_factor: Annotated[int, Field(ge=2)] = 2
    max_concurrent: PositiveInt = 1
    space: dict[str, Any] = Field(default_factory=dict)


# --------------------------------------------------------------------------------------------- eval
class EvalConfig(Strict):
    model_dir: str | None = Field(None, description="default: the run's exported model")
    batch_size: PositiveInt = 8
    max_batches: PositiveInt | None = None


# -------------------------------------------------------------------------------------------- serve
class ReplicaConfig(Strict):
    min: NonNegInt = 1
    max: PositiveInt = 1
    target_ongoing_requests: PositiveFloat = 8.0

    @model_validator(mode="after")
    def _ordered(self) -> ReplicaConfig:
        if self.min > self.max:
            raise ValueError(f"min={self.min} is greater than max={self.max}")
        return self


class ServeConfig(Strict):
    model_dir: str | None = Field(None, description="default: the run's exported model")
    model_name: str | None = Field(None, description="id clients send; default: the folder name")
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    replicas: ReplicaConfig = Field(default_factory=ReplicaConfig)
    cpus_per_replica: PositiveFloat = 1.0
    gpus_per_replica: Annotated[float, Field(ge=0)] = 0.0
    max_batch: PositiveInt = 16
    batch_wait_ms: Annotated[float, Field(ge=0)] = 10.0
    max_tokens_limit: PositiveInt = 1024
    default_max_tokens: PositiveInt = 64
    max_body_bytes: PositiveInt = 1_000_000
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"


# ------------------------------------------------------------------------------------------ cluster
class ClusterConfig(Strict):
    address: str | None = Field(None, description="Ray address; default: $RAY_ADDRESS, else local")
    num_cpus: PositiveInt | None = Field(None, description="local cluster only; default: all cores")
    object_store_gb: PositiveFloat | None = Field(None, description="local cluster only")
    dashboard: bool = True
    verbose: bool = False
    env_vars: dict[str, str] = Field(default_factory=dict)
    working_dir: str | None = None


class RunConfig(Strict):
    run_dir: str = "runs/default"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

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
        return self.model_dump(mode="json")


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
        elif "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], dict):
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
            nxt = node.setdefault(part, {})
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
    """The config reference in the README: generated from the schema so that the two never drift."""
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
            if sub is not None and name != "sources":
                nested.append((name, sub))
                continue
            default = "[]" if name == "sources" else field.get_default(call_default_factory=True)
            default = "required" if field.is_required() else default
            rows.append(f"| `{prefix}{name}` | {_type_name(ann)} | `{default}` | {field.description or ''} |")
        if rows:
            lines.extend(
                [
                    f"\n**{prefix.rstrip('.') or 'top level'}**\n",
                    "| key | type | default | notes |",
                    "|---|---|---|---|",
                    *rows,
                ]
            )
        for name, sub in nested:
            walk(sub, f"{prefix}{name}.")

    walk(RunConfig, "")
    walk(SourceConfig, "data.sources[].")
    return "\n".join(lines).strip() + "\n"
