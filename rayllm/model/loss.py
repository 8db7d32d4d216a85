"""The one next-token loss: training, validation during training, and eval all call ``NextTokenLoss``.

It wraps a plain Hugging Face causal LM (the model itself stays untouched) and returns sums, so that
callers normalise over exactly the tokens they mean: a packed block's every position, or only the
answer tokens of a fine-tuning example (targets of ``IGNORE`` are left out).

Three implementations of the same value (``train.loss``):
- ``full``: the model's logits for every position, then ``F.cross_entropy``. At GPT-2's vocabulary
  that is batch x seq x 50k floats written and read once per micro-batch.
- ``chunked``: the last hidden states times the output embedding a few thousand positions at a time;
  each chunk's gradient is computed in the forward pass (as Liger Kernel's fused linear cross entropy
  does), so the full logits never exist. Plain PyTorch: any device.
- ``liger``: Liger Kernel's fused Triton kernel for the same computation (CUDA).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100
# Positions per chunk: logits of one chunk at a 50k vocabulary are ~200 MB in fp32.
CHUNK_TOKENS = 1024
# Configs whose logits are not just hidden @ embedding^T (soft-capping, scaling): only `full` is exact.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def shift(
    input_ids: torch.Tensor, loss_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed blocks of ``seq_len + 1`` tokens -> (inputs, targets); masked-out targets become IGNORE."""
    targets = input_ids[:, 1:]
    if loss_mask is not None:
        targets = targets.masked_fill(loss_mask[:, 1:] == 0, IGNORE)
    return input_ids[:, :-1], targets


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum of cross entropy of ``hidden @ weight.T`` against ``targets``, chunk by chunk.

    Forward computes each chunk's logits in fp32, its loss, and the gradients w.r.t. ``hidden`` and
    ``weight`` (softmax minus one-hot); backward only scales them. Peak memory is one chunk of
    logits instead of all of them, and no matmul is recomputed. A gradient is computed only for an
    input that needs one (LoRA's frozen output embedding needs none: a third of the loss's matmuls),
    the argmax only when ``accuracy`` asks, and the target mask multiplies the chunk's hidden states
    and its hidden-state gradient, not its vocabulary-wide logits.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        accuracy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = (h @ weight.T).float()
            valid = t != IGNORE
            safe = t.clamp(min=0)
            if accuracy:
                correct += ((logits.argmax(-1) == t) & valid).sum()
            logp = torch.log_softmax(logits, dim=-1)  # one fused pass; logsumexp then sub is three
            del logits
            total -= (logp.gather(1, safe[:, None])[:, 0] * valid).sum()
            if need_h or need_w:
                g = logp.exp_()  # softmax, in place of the log-probabilities
                g[torch.arange(len(t), device=g.device), safe] -= 1.0
                g = g.to(hidden.dtype)
                keep = valid[:, None].to(hidden.dtype)
                if need_h:
                    grad_h[start : start + chunk] = (g @ weight) * keep  # type: ignore[index]
                if need_w:
                    grad_w.addmm_(g.T.float(), (h * keep).float())  # type: ignore[union-attr]
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(correct)
        return total, correct

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor, _: Any) -> tuple[Any, ...]:  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        return (
            None if grad_h is None else grad_h * grad_total.to(grad_h.dtype),
            None if grad_w is None else grad_w * grad_total,
            None,
            None,
            None,
        )


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = CHUNK_TOKENS,
    accuracy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token NLL, correct argmax predictions or 0 without ``accuracy``) over ``hidden``
    [N, d], ``targets`` [N]."""
    total, correct = _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk, accuracy)
    return total, correct


def resolve_impl(impl: str, model: Any, device: torch.device) -> str:
    """``auto``: Liger's kernel on CUDA when installed, else the chunked loss; ``full`` wherever the
    logits are more than hidden states times the output embedding (soft-capping, biases)."""
    head = model.get_output_embeddings()
    text = model.config.get_text_config()
    if (
        head is None
        or getattr(head, "bias", None) is not None
        or any(getattr(text, name, None) for name in _LOGIT_TRANSFORMS)
    ):
        return "full"
    if impl != "auto":
        return impl
    if device.type == "cuda":
        try:
            import liger_kernel  # noqa: F401

            return "liger"
        except ImportError:
            pass
    return "chunked"


class NextTokenLoss(nn.Module):
    """A plain causal LM plus its next-token loss. ``forward`` returns sums over non-ignored targets:
    (NLL, target count, correct argmax predictions; the last is 0 where ``accuracy`` is off)."""

    def __init__(self, lm: nn.Module, impl: str = "full") -> None:
        super().__init__()
        self.lm = lm
        self.impl = impl

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        accuracy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # use_cache=False: no KV cache in training, and position_ids that restart mark packed
        # documents, which transformers then keeps attention from crossing.
        kwargs = {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}
        flat_targets = targets.reshape(-1)
        count = (flat_targets != IGNORE).sum()
        if self.impl == "full":
            logits = self.lm(**kwargs).logits.float().flatten(0, 1)
            nll = F.cross_entropy(logits, flat_targets, ignore_index=IGNORE, reduction="sum")
            correct = (
                ((logits.argmax(-1) == flat_targets) & (flat_targets != IGNORE)).sum()
                if accuracy
                else torch.zeros_like(count)
            )
            return nll, count, correct
        hidden = self.lm.base_model(**kwargs).last_hidden_state.flatten(0, 1)
        weight = self.lm.get_output_embeddings().weight
        if self.impl == "liger" and not accuracy:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            nll = liger_fused_linear_cross_entropy(
                hidden, weight, flat_targets, ignore_index=IGNORE, reduction="sum"
            )
            nll = nll[0] if isinstance(nll, tuple) else nll  # some releases also return the z-loss
            return nll, count, torch.zeros_like(count)
        nll, correct = chunked_linear_cross_entropy(hidden, weight, flat_targets, accuracy=accuracy)
        return nll, count, correct
