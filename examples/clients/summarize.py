"""Summarize a text with a model served by `rayllm serve`, streaming the summary as it is generated.

python examples/clients/summarize.py                   # a built-in paragraph
python examples/clients/summarize.py --file notes.txt --max-tokens 120
"""

from __future__ import annotations

import argparse
from pathlib import Path

from openai import OpenAI

DEFAULT_TEXT = (
    "Ray is an open-source framework for scaling Python applications. Ray Data loads and transforms data "
    "in parallel across a cluster, Ray Train runs distributed training loops such as PyTorch with "
    "DeepSpeed, Ray Tune searches hyperparameters by running many trials at once and stopping bad ones "
    "early, and Ray Serve puts models behind HTTP endpoints that batch requests and scale replicas with "
    "the load."
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file", type=Path, help="text file to summarize (UTF-8); default: a built-in paragraph")
    p.add_argument("--max-tokens", type=int, default=80)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", help="default: the server's only model")
    args = p.parse_args()
    text = args.file.read_text(encoding="utf-8") if args.file else DEFAULT_TEXT
    client = OpenAI(base_url=args.base_url, api_key="unused")
    model = args.model or client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "Summarize the user's text in one or two sentences."},
            {"role": "user", "content": text},
        ],
        max_tokens=args.max_tokens,
        temperature=0.3,
        seed=0,
        stream=True,
    )
    usage = None
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
        usage = chunk.usage or usage
    print()
    if usage:
        print(f"[{usage.prompt_tokens} prompt tokens, {usage.completion_tokens} generated]")


if __name__ == "__main__":
    main()
