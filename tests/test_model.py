"""The one next-token loss (full and chunked) and the training switches, in-process on CPU.

The switches are exercised through the same ``parallelize`` and ``Worker.train_step`` the Ray Train
workers run: a one-rank DeepSpeed engine on gloo, ten steps per combination.
"""

from __future__ import annotations

import itertools
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from rayllm.model.loss import IGNORE, NextTokenLoss, chunked_linear_cross_entropy, resolve_impl, shift


def assert_rel(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    """Relative to the tensor's size (an entry near zero has no meaningful relative error)."""
    err = ((got - want).norm() / want.norm()).item()
    assert err <= rel, f"relative error {err:.2e} > {rel:.0e}"


def _reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE, reduction="sum")


@pytest.mark.parametrize("chunk", [7, 64, 1024])
def test_chunked_loss_equals_cross_entropy_in_value_and_gradients(chunk: int) -> None:
    """fp32, a vocabulary not a multiple of the chunk, a quarter of the targets ignored."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(150, 32, generator=g, requires_grad=True)
    weight = torch.randn(1001, 32, generator=g, requires_grad=True)
    targets = torch.randint(0, 1001, (150,), generator=g)
    targets[torch.rand(150, generator=g) < 0.25] = IGNORE
    want = _reference(hidden, weight, targets)
    want_h, want_w = torch.autograd.grad(want * 1.7, (hidden, weight))
    got, correct = chunked_linear_cross_entropy(hidden, weight, targets, chunk=chunk)
    got_h, got_w = torch.autograd.grad(got * 1.7, (hidden, weight))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    assert_rel(got_h, want_h, 1e-5)
    assert_rel(got_w, want_w, 1e-5)
    logits = hidden.detach() @ weight.detach().T
    assert correct.item() == int(((logits.argmax(-1) == targets) & (targets != IGNORE)).sum())


def test_chunked_loss_skips_what_is_not_asked_for() -> None:
    """A frozen output embedding (LoRA) gets no gradient, and without ``accuracy`` no argmax: the
    hidden-state gradient and the loss are still exact."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(90, 16, generator=g, requires_grad=True)
    weight = torch.randn(257, 16, generator=g)  # frozen
    targets = torch.randint(0, 257, (90,), generator=g)
    targets[::4] = IGNORE
    want = _reference(hidden, weight, targets)
    (want_h,) = torch.autograd.grad(want, (hidden,))
    got, correct = chunked_linear_cross_entropy(hidden, weight, targets, chunk=32, accuracy=False)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    assert_rel(hidden.grad, want_h, 1e-5)
    assert weight.grad is None and correct.item() == 0


def _tiny_lm(tie: bool = True):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2, tie_word_embeddings=tie,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg)


@pytest.mark.parametrize("tie", [True, False])
def test_model_loss_is_the_same_for_every_implementation(tie: bool) -> None:
    lm = _tiny_lm(tie)
    ids = torch.randint(0, 300, (3, 33), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[:, :10] = 0  # a prompt: only the answer tokens are targets
    inputs, targets = shift(ids, mask)
    assert (targets[:, :9] == IGNORE).all() and (targets[:, 9:] != IGNORE).all()
    results = {}
    for impl in ("full", "chunked"):
        lm.zero_grad()
        nll, count, correct = NextTokenLoss(lm, impl)(inputs, targets, accuracy=True)
        (nll / count).backward()
        results[impl] = (nll.detach(), count, correct, [p.grad.clone() for p in lm.parameters()])
    (a, ca, ka, ga), (b, cb, kb, gb) = results["full"], results["chunked"]
    torch.testing.assert_close(b, a, rtol=1e-5, atol=0)
    assert ca.item() == cb.item() == 3 * 23 and ka.item() == kb.item()
    for x, y in zip(ga, gb, strict=True):
        assert_rel(y, x, 1e-5)
    assert resolve_impl("auto", lm, torch.device("cpu")) == "chunked"


def test_packed_documents_do_not_attend_across_boundaries() -> None:
    """position_ids that restart mark documents: an example's logits equal its logits alone."""
    lm = _tiny_lm().eval()
    a = torch.randint(1, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    b = torch.randint(1, 300, (1, 9), generator=torch.Generator().manual_seed(3))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(12), torch.arange(9)])[None]
    with torch.no_grad():
        together = lm(input_ids=packed, position_ids=positions, use_cache=False).logits
        alone = lm(input_ids=b, use_cache=False).logits
        crossing = lm(input_ids=packed, use_cache=False).logits
    torch.testing.assert_close(together[:, 12:], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(crossing[:, 12:], alone, atol=1e-3)  # without boundaries it would differ


# -------------------------------------------------------------------------------- training switches
@pytest.fixture(scope="module")
def one_rank_group():
    """A one-rank gloo process group in this process, as a Ray Train worker has."""
    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}
        os.environ.update(env, LOCAL_RANK="0")
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


SWITCHES = [
    *itertools.product(["full", "chunked"], ["adamw", "adamw-fused"], [0, 2]),
    *itertools.product(["chunked"], ["muon"], [0, 1, 2]),
]
IDS = [f"{a}-{b}-zero{c}" for a, b, c in SWITCHES]


def _worker(lm, t):
    """The training loop's own ``Worker`` around ``parallelize(t)``, on this one-rank group."""
    from rayllm.train.loop import Worker
    from rayllm.train.parallel import parallelize

    cpu = torch.device("cpu")
    engine, scheduler = parallelize(NextTokenLoss(lm, resolve_impl(t.loss, lm, cpu)), t, 1, False)
    return Worker(t, engine, scheduler, device=cpu, seq_len=32)


def _batch(data: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A global batch as the loader hands it to ``train_step`` (collated by the loop's ``RankSlice``)."""
    from rayllm.train.loop import RankSlice

    cols = {"input_ids": data.numpy()}
    if mask is not None:
        cols["loss_mask"] = mask.numpy()
    return RankSlice(0, 1)(cols)


def _trains(lm, t) -> None:
    """Ten ``train_step`` calls of ``lm`` under ``parallelize(t)`` on a learnable batch: the loss
    drops, and on CPU without train.deepspeed.compile nothing is compiled (DeepSpeed's Muon kernels
    included: inductor would spend a minute on them for no faster steps)."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    worker = _worker(lm, t)
    data = torch.randint(0, 300, (8, 33), generator=torch.Generator().manual_seed(4))
    data[:, 16:] = data[:, :16].flip(1).repeat(1, 2)[:, :17]  # something learnable
    batch = _batch(data)
    losses = [(worker.train_step(batch) / batch["tokens"]).item() for _ in range(10)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.3, losses
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("zero", [0, 2])
def test_train_step_is_one_sgd_step_on_the_mean_over_the_global_batch_targets(one_rank_group, zero):
    """The loop's real ``train_step``, with two micro-batches whose examples have very different
    target counts (a fine-tuning loss mask): the update is exactly one SGD step on the mean NLL
    over all the global batch's targets, not a mean of per-micro-batch means."""
    from rayllm.config import TrainConfig

    t = TrainConfig(
        workers=1, global_batch=4, micro_batch=2, max_steps=1, grad_clip=0.0,
        optimizer={"name": "sgd", "lr": 0.5, "momentum": 0.0, "weight_decay": 0.0},
        schedule={"decay": "constant", "warmup_steps": 0}, deepspeed={"zero_stage": zero},
    )  # fmt: skip
    lm, reference = _tiny_lm(), _tiny_lm()
    data = torch.randint(0, 300, (4, 33), generator=torch.Generator().manual_seed(6))
    mask = torch.zeros(4, 33, dtype=torch.int64)
    for row, answer in enumerate([30, 2, 1, 16]):  # targets per example: 30, 2, 1 and 16
        mask[row, 33 - answer :] = 1
    worker = _worker(lm, t)
    assert worker.accum == 2
    nll_sum = worker.train_step(_batch(data, mask))

    inputs, targets = shift(data, mask)
    logits = reference(inputs).logits
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    (nll / 49).backward()
    torch.testing.assert_close(nll_sum, nll.detach(), rtol=1e-5, atol=1e-4)
    trained = dict(worker.engine.module.lm.named_parameters())
    with torch.no_grad():
        for name, p in reference.named_parameters():
            torch.testing.assert_close(trained[name], p - 0.5 * p.grad, rtol=1e-4, atol=1e-6)
    assert not torch.equal(
        trained["transformer.h.0.mlp.c_fc.weight"], _tiny_lm().transformer.h[0].mlp.c_fc.weight
    )


@pytest.mark.parametrize(("loss", "optimizer", "zero"), SWITCHES, ids=IDS)
def test_every_switch_combination_trains(one_rank_group, loss: str, optimizer: str, zero: int) -> None:
    from rayllm.config import TrainConfig

    opt = {"name": optimizer.split("-")[0], "lr": 3e-3, "fused": optimizer.endswith("fused"), "muon_lr": 0.02}
    t = TrainConfig(
        workers=1, global_batch=8, micro_batch=4, max_steps=10, loss=loss, optimizer=opt,
        schedule={"decay": "wsd", "warmup_steps": 2}, deepspeed={"zero_stage": zero},
    )  # fmt: skip
    _trains(_tiny_lm(), t)


def test_config_defined_llama_trains(one_rank_group) -> None:
    """``model.family: llama`` (RMSNorm, RoPE, SwiGLU, grouped-query attention) from the config."""
    from rayllm.config import ModelConfig, TrainConfig
    from rayllm.model.build import build_model, model_config

    m = ModelConfig(family="llama", n_layer=2, n_head=2, n_kv_head=1, d_model=32, max_positions=64)
    hf = model_config(m, 300, 0, 1)
    assert (hf.model_type, hf.num_key_value_heads, hf.vocab_size) == ("llama", 1, 320)
    torch.manual_seed(0)
    t = TrainConfig(workers=1, global_batch=8, micro_batch=4, max_steps=10, optimizer={"lr": 3e-3})
    _trains(build_model(m, hf), t)


def test_micro_batch_auto_takes_the_largest_that_fits() -> None:
    from rayllm.config import TrainConfig
    from rayllm.train.parallel import resolve_micro_batch

    objective = NextTokenLoss(_tiny_lm(), "chunked")
    t = TrainConfig(workers=[1, 2], global_batch=24, micro_batch="auto")
    cpu = torch.device("cpu")
    assert resolve_micro_batch(t, 2, objective, cpu, seq_len=32) == 12  # the whole share: no accumulation
    assert resolve_micro_batch(t, 1, objective, cpu, seq_len=32) == 24
    assert resolve_micro_batch(t, 2, objective, cpu, seq_len=10**7) == 1  # nothing fits: the smallest
    fixed = TrainConfig(workers=2, global_batch=24, micro_batch=4)
    assert resolve_micro_batch(fixed, 2, objective, cpu, seq_len=32) == 4


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(one_rank_group) -> None:
    """GPT-2's wte/wpe are matrices by DeepSpeed's name rule; here they go to AdamW, as the head."""
    from rayllm.config import TrainConfig
    from rayllm.train.parallel import parallelize

    lm = _tiny_lm(tie=False)
    t = TrainConfig(workers=1, global_batch=8, micro_batch=4, optimizer={"name": "muon"})
    engine, _ = parallelize(NextTokenLoss(lm, "chunked"), t, 1, False)
    assert type(engine.optimizer.optimizer).__name__ == "MuonWithAuxAdam"
    # The other parameters step with DeepSpeed's FusedAdam, whose CPU op `make install` builds.
    assert type(engine.optimizer.optimizer.aux_optimizer).__name__ == "FusedAdam"
    names = {n for n, p in lm.named_parameters() if p.use_muon}
    assert names and all(n.startswith("transformer.h.") and n.endswith("weight") for n in names)
    embeddings = (lm.transformer.wte.weight, lm.transformer.wpe.weight, lm.lm_head.weight)
    assert not any(p.use_muon for p in embeddings)


def test_warmup_stable_decay_and_batch_scaling() -> None:
    from rayllm.config import ScheduleConfig, TrainConfig
    from rayllm.train.parallel import lr_lambda, lr_scale

    wsd = lr_lambda(ScheduleConfig(warmup_steps=10, decay="wsd", decay_fraction=0.2, min_lr_ratio=0.0), 100)
    assert wsd(4) == pytest.approx(5 / 11) and wsd(10) == wsd(50) == wsd(80) == 1.0
    assert wsd(90) == pytest.approx(0.5) and wsd(100) == 0.0
    t = TrainConfig(
        workers=1, global_batch=64, micro_batch=8, optimizer={"lr_scaling": "sqrt", "reference_batch": 16}
    )
    assert lr_scale(t) == pytest.approx(2.0)
    assert lr_lambda(ScheduleConfig(decay="constant"), 10, lr_scale(t))(5) == pytest.approx(2.0)


@pytest.mark.parametrize("zero", [0, 2])
@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_optimizer_and_schedule_state_resume_exactly(
    one_rank_group, tmp_path, optimizer: str, zero: int
) -> None:
    """Ten steps straight, or five, a DeepSpeed checkpoint, a fresh engine loading it, five more:
    the same losses (Muon's momentum, Adam's moments and the WSD schedule all come back)."""
    from rayllm.config import TrainConfig

    t = TrainConfig(
        workers=1, global_batch=8, micro_batch=8, max_steps=10, optimizer={"name": optimizer, "lr": 3e-3},
        schedule={"decay": "wsd", "warmup_steps": 2, "decay_fraction": 0.5}, deepspeed={"zero_stage": zero},
    )  # fmt: skip
    batch = _batch(torch.randint(0, 300, (8, 33), generator=torch.Generator().manual_seed(5)))

    def steps(w, n: int) -> list[float]:
        return [(w.train_step(batch) / batch["tokens"]).item() for _ in range(n)]

    straight = steps(_worker(_tiny_lm(), t), 10)
    first = _worker(_tiny_lm(), t)
    losses = steps(first, 5)
    first.engine.save_checkpoint(str(tmp_path), tag="ckpt")
    second = _worker(_tiny_lm(), t)
    second.engine.load_checkpoint(
        str(tmp_path), tag="ckpt", load_optimizer_states=True, load_lr_scheduler_states=True
    )
    losses += steps(second, 5)
    assert losses == pytest.approx(straight, rel=1e-6)
    assert straight[-1] < straight[0] - 0.3
