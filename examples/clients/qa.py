"""Question answering two ways against `rayllm serve`: free-form, and multiple choice by log-likelihood.

The multiple-choice part scores each candidate answer the way evaluation harnesses do with the legacy
completions API: ``echo=True, max_tokens=0, logprobs=1`` returns the log-probability of every prompt
token, and the answer tokens' sum ranks the choices. It works for base models that cannot chat.

    python examples/clients/qa.py
"""

from __future__ import annotations

import argparse

from openai import OpenAI

CONTEXT = "The Eiffel Tower is in Paris. It was finished in 1889 and is about 330 metres tall."
QUESTIONS = [
    ("In which city is the Eiffel Tower?", ["Paris", "London", "Rome"]),
    ("When was the tower finished?", ["1889", "1950", "1756"]),
]


def answer_logprob(client: OpenAI, model: str, prompt: str, answer: str) -> float:
    """log P(answer | prompt): the sum over the answer's tokens, read from the echoed prompt."""
    r = client.completions.create(model=model, prompt=prompt + answer, max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    start = next(i for i, offset in enumerate(lp.text_offset) if offset >= len(prompt))
    return sum(v for v in lp.token_logprobs[start:] if v is not None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", help="default: the server's only model")
    args = p.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="unused")
    model = args.model or client.models.list().data[0].id
    for question, choices in QUESTIONS:
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"{CONTEXT}\n\nQuestion: {question}"}],
            max_tokens=30,
            temperature=0,
        )
        prompt = f"{CONTEXT}\nQuestion: {question}\nAnswer:"
        scores = {c: answer_logprob(client, model, prompt, " " + c) for c in choices}
        best = max(scores, key=scores.__getitem__)
        print(f"Q: {question}\n  free-form: {reply.choices[0].message.content.strip()!r}")
        print("  by log-likelihood: " + ", ".join(f"{c} {s:.2f}" for c, s in scores.items()) + f" -> {best}")


if __name__ == "__main__":
    main()
