"""Chat formatting shared by fine-tuning (prep), generation (eval) and serving: one rendering of
messages, so a model is prompted exactly the way it was trained.

A tokenizer's own chat template is used when it has one. Base models (the ones `rayllm train` builds
from scratch) get "System: ...\\nUser: ...\\nAssistant:" turns; such a model tends to write the next
"User:" turn itself, which is why that is a stop string wherever this fallback is in use.
"""

from __future__ import annotations

from typing import Any

FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
FALLBACK_CHAT_STOP = "\nUser:"


def template(tokenizer: Any) -> str:
    return tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE


def stops(tokenizer: Any) -> tuple[str, ...]:
    """Stop strings a generation needs beyond the tokenizer's end-of-sequence tokens."""
    return () if tokenizer.chat_template else (FALLBACK_CHAT_STOP,)


def render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages,
        chat_template=template(tokenizer),
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
    )


def prompt_and_answer(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of an example and its loss mask: 0 for the prompt (every turn before the last and
    the assistant header the template adds), 1 for the last assistant turn to the template's end
    of turn. The rendered prompt must be a prefix of the rendered example, as chat templates make it."""
    prompt = tokenizer(render(tokenizer, messages[:-1], True), add_special_tokens=False)["input_ids"]
    full = tokenizer(render(tokenizer, messages, False), add_special_tokens=False)["input_ids"]
    if full[: len(prompt)] != prompt:
        raise ValueError("the chat template does not render the prompt as a prefix of the whole example")
    if not tokenizer.chat_template and tokenizer.eos_token_id is not None:
        full = [*full, tokenizer.eos_token_id]  # the fallback template has no end-of-turn token
    return full, [0] * len(prompt) + [1] * (len(full) - len(prompt))
