"""Complete Python code with a model served by `rayllm serve` (legacy completions API, streamed).

Generation stops at the next top-level definition, as code-completion tools ask for.

    python examples/clients/codegen.py
    python examples/clients/codegen.py --prompt-file stub.py --max-tokens 200
"""

from __future__ import annotations

import argparse
from pathlib import Path

from openai import OpenAI

DEFAULT_PROMPT = '''def is_palindrome(text: str) -> bool:
    """Return True if text reads the same forwards and backwards, ignoring case and spaces."""
'''
STOP = ["\ndef ", "\nclass ", "\nif __name__", "\n\n\n"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-file", type=Path, help="code to complete; default: a function stub")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", help="default: the server's only model")
    args = p.parse_args()
    prompt = args.prompt_file.read_text(encoding="utf-8") if args.prompt_file else DEFAULT_PROMPT
    client = OpenAI(base_url=args.base_url, api_key="unused")
    model = args.model or client.models.list().data[0].id
    print(prompt, end="")
    for chunk in client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=args.max_tokens,
        temperature=0.2,
        seed=0,
        stop=STOP,
        stream=True,
    ):
        if chunk.choices:
            print(chunk.choices[0].text, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
