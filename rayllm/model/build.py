"""Building a plain Hugging Face causal LM from the config or a local folder, its context length and
its FLOPs per token.

Model code stays plain transformers: precision, ZeRO, offload, activation checkpointing and compile
are applied by ``rayllm.train.parallel`` (as torchtitan keeps parallelism apart from its models).
"""

from __future__ import annotations

import os
from typing import Any

from rayllm.config import LoraConfig, ModelConfig
from rayllm.errors import ConfigError


def _pad_vocab(n: int, multiple: int = 64) -> int:
    """Embedding rows rounded up: matmuls on multiples of 64 run faster on every accelerator."""
    return (n + multiple - 1) // multiple * multiple


def model_config(cfg: ModelConfig, vocab_size: int, eos_id: int, pad_id: int) -> Any:
    """The transformers config object for ``cfg`` (from its folder when ``cfg.path`` is set). Each
    branch imports its own config class: every training process pays for what it imports."""
    if cfg.path:
        from transformers import AutoConfig

        if not os.path.isfile(os.path.join(cfg.path, "config.json")):
            raise ConfigError(
                f"model.path: {cfg.path} is not a Hugging Face model folder (no config.json in it); "
                "point it at a folder written by save_pretrained or `rayllm export`"
            )
        try:
            hf = AutoConfig.from_pretrained(cfg.path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.path: cannot read {cfg.path}/config.json: {e}") from None
        if getattr(hf, "vocab_size", 0) < vocab_size:
            raise ConfigError(
                f"model.path: {cfg.path} has vocab_size={hf.vocab_size} but the data's tokenizer has "
                f"{vocab_size} tokens; prep with this model's tokenizer (data.tokenizer.path={cfg.path})"
            )
        return hf
    vocab = _pad_vocab(vocab_size)
    if cfg.family == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=vocab,
            n_positions=cfg.max_positions,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_inner=cfg.d_ff,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            tie_word_embeddings=cfg.tie_embeddings,
            # GPT-2's own GELU (gelu_new) is the same tanh formula in six eager ops; this is one kernel.
            activation_function="gelu_pytorch_tanh" if cfg.activation == "default" else cfg.activation,
        )
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff or _pad_vocab(int(8 * cfg.d_model / 3), 64),
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head or cfg.n_head,
        max_position_embeddings=cfg.max_positions,
        attention_dropout=cfg.dropout,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=cfg.tie_embeddings,
        **({} if cfg.activation == "default" else {"hidden_act": cfg.activation}),
    )


def context_length(hf_config: Any, tokenizer: Any = None) -> int:
    """Positions the model can attend over: what train checks ``seq_len`` against and serve checks
    prompts against. The config's own field first, then the tokenizer's ``model_max_length``."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    raise ConfigError(
        f"cannot tell the context length of this {getattr(text, 'model_type', 'model')}: its config.json "
        "has no max_position_embeddings (or n_positions); add one"
    )


def build_model(cfg: ModelConfig, hf_config: Any) -> Any:
    """A fresh model from ``hf_config``, or the pretrained weights when ``cfg.path`` is set."""
    from transformers import AutoModelForCausalLM

    try:
        if cfg.path:
            return AutoModelForCausalLM.from_pretrained(cfg.path, attn_implementation=cfg.attention)
        return AutoModelForCausalLM.from_config(hf_config, attn_implementation=cfg.attention)
    except ImportError as e:  # e.g. flash_attention_2 without the flash-attn package on this worker
        raise ConfigError(
            f"model.attention={cfg.attention}: {e}; use sdpa or install what it needs"
        ) from None


def add_adapters(model: Any, lora: LoraConfig) -> Any:
    """LoRA adapters injected in place (peft): the model keeps its own class and modules, so the loss
    and the parallel wrappers see a plain transformers model; only adapter weights train."""
    from peft import inject_adapter_in_model

    model = inject_adapter_in_model(lora.peft(), model)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    return model


def merge_adapters(model: Any, lora: LoraConfig, weights: dict[str, Any]) -> Any:
    """A plain model whose weights are ``weights`` (base + adapters, as training saved them) with the
    adapters merged in: what an export holds, loadable without peft."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora.peft())
    missing, unexpected = peft_model.base_model.model.load_state_dict(weights, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"adapter weights do not match: missing={missing} unexpected={unexpected}")
    return peft_model.merge_and_unload()


def flops_per_token(hf_config: Any, n_params: int, seq_len: int, frozen: int = 0) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12*L*d*T for attention (PaLM appendix B);
    a frozen weight (LoRA's base) costs 4 (forward and input gradient, no weight gradient)."""
    layers = getattr(hf_config, "num_hidden_layers", None) or hf_config.n_layer
    d = getattr(hf_config, "hidden_size", None) or hf_config.n_embd
    return 6.0 * n_params - 2.0 * frozen + 12.0 * layers * d * seq_len


def count_params(model: Any, exclude_embeddings: bool = True, frozen: bool = False) -> int:
    """Parameters that do matmul work per token: the input embedding lookup is not a matmul.
    ``frozen``: only those that do not train."""
    total = sum(p.numel() for p in model.parameters() if not (frozen and p.requires_grad))
    if exclude_embeddings:
        emb = model.get_input_embeddings().weight
        tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is emb
        if not tied and not (frozen and emb.requires_grad):
            total -= emb.numel()
    return total
