"""Translate English text with a model served by `rayllm serve`, through the official OpenAI client.

    rayllm serve -c examples/configs/shakespeare-cpu.yaml      # in another shell
    python examples/clients/translate.py                       # English -> Chinese examples
    python examples/clients/translate.py --to German "Where is the train station?"

Chat models (e.g. SmolLM2-Instruct) follow the instruction; a small base model trained by rayllm only
continues the few-shot pattern, so expect its output to be rough.
"""

from __future__ import annotations

import argparse

from openai import OpenAI

EXAMPLES = {
    "Chinese": [("Good morning.", "早上好。"), ("Thank you very much.", "非常感谢。")],
    "German": [("Good morning.", "Guten Morgen."), ("Thank you very much.", "Vielen Dank.")],
    "French": [("Good morning.", "Bonjour."), ("Thank you very much.", "Merci beaucoup.")],
}
DEFAULT_TEXTS = ["How are you today?", "The weather is nice, let's go for a walk.", "I love reading books."]


def translate(client: OpenAI, model: str, text: str, target: str) -> str:
    shots = EXAMPLES.get(target, EXAMPLES["Chinese"])
    messages = [
        {
            "role": "system",
            "content": f"You translate English into {target}. Answer with the translation only.",
        }
    ]
    for source, translation in shots:
        messages += [{"role": "user", "content": source}, {"role": "assistant", "content": translation}]
    messages.append({"role": "user", "content": text})
    reply = client.chat.completions.create(
        model=model, messages=messages, max_tokens=40, temperature=0, stop=["\n"]
    )
    return reply.choices[0].message.content.strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("texts", nargs="*", help="English sentences; default: a few examples")
    p.add_argument("--to", default="Chinese", help="target language (Chinese, German, French have examples)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", help="default: the server's only model")
    args = p.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="unused")
    model = args.model or client.models.list().data[0].id
    for text in args.texts or DEFAULT_TEXTS:
        print(f"{text}\n  -> {translate(client, model, text, args.to)}")


if __name__ == "__main__":
    main()
