"""Exact, memory-light token log-probs: the fused log-prob kernels of the A-LoL loss.

    token_logprobs(logits, targets, mask)                  -> fp32 [B, T] log-probs, from logits
    linear_token_logprobs(hidden, weight, targets, mask)   -> fp32 [B, T] log-probs, LM head fused in

The loss itself lives in one place, alol.py's `alol_loss(logp, ref_logp, mask, reward, value, algo, clip_eps)`,
which takes these token log-probs; nothing here repeats it.

Convention: targets[b, t] is the token scored by logits[b, t] (or hidden[b, t]); the caller shifts
(`hidden[:, :-1]` with `ids[:, 1:]`). Only positions with mask != 0 are computed: they are compacted first, so
prompt and padding tokens cost no FLOPs, and their logits, hidden states and targets are never read.

Log-sum-exp and log-probs are fp32 whatever the input dtype (fp32, fp16, bf16), so the sequence sums and ratios
alol_loss forms from them are fp32 too: in the kernel chapter's example (tutorial.md, T = 128) bf16 logits put an
18 % error into exp(S - S_ref), almost the whole clip range at eps = 0.2.

Backends: `backend=None` reads ALOL_KERNEL_BACKEND (default "auto").
    auto   - Triton for CUDA tensors; the Triton interpreter if TRITON_INTERPRET=1; else the chunked PyTorch path
    torch  - the chunked PyTorch path (kernels/torch_ops.py) everywhere
    triton - the Triton kernels (kernels/triton_ops.py); an error if triton is missing or cannot run here
The package imports without triton.
"""
import os

import torch

from . import torch_ops

try:
    from . import triton_ops
except ImportError:  # triton not installed: the PyTorch path still works
    triton_ops = None

__all__ = ["token_logprobs", "linear_token_logprobs"]

BACKENDS = ("auto", "torch", "triton")


def _ops(backend, x):
    """The module (torch_ops or triton_ops) that computes log-probs for tensor x."""
    name = backend or os.environ.get("ALOL_KERNEL_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose from {BACKENDS}")
    if name == "torch":
        return torch_ops
    if name == "auto" and x.is_cuda and x.dtype == torch.float64:
        return torch_ops  # tl.dot has no fp64 path on GPUs; fp64 (gradcheck) runs the PyTorch path
    runnable = triton_ops is not None and (x.is_cuda or triton_ops.INTERPRET)
    if name == "triton" and not runnable:
        why = ("triton is not installed" if triton_ops is None
               else "tensors are not on CUDA and TRITON_INTERPRET=1 is not set")
        raise RuntimeError(f"kernel backend 'triton' cannot run: {why}. Use backend='torch' (or 'auto').")
    return triton_ops if runnable else torch_ops


def _compact(targets, mask, vocab_size):
    """Indices (b, t) of the response tokens and their targets; checks targets are in [0, V)."""
    b_idx, t_idx = torch.nonzero(mask, as_tuple=True)
    y = targets[b_idx, t_idx].long()
    if y.numel() and not bool(((y >= 0) & (y < vocab_size)).all()):
        raise IndexError(f"targets at masked-in positions must lie in [0, {vocab_size})")
    return b_idx, t_idx, y


def _scatter(logp, b_idx, t_idx, shape):
    """[N] log-probs back to [B, T], zero outside the mask (differentiable)."""
    return logp.new_zeros(shape).index_put((b_idx, t_idx), logp)


def token_logprobs(logits, targets, mask, backend=None):
    """log softmax(logits[b, t])[targets[b, t]] where mask != 0, else 0.

    logits [B, T, V] (any float dtype, any strides), targets [B, T] int, mask [B, T] bool/int/float 0-1;
    targets[b, t] is the token scored by logits[b, t] (the caller shifts). Returns fp32 [B, T] (fp64 for fp64
    logits on the torch path) with autograd to logits; masked rows get exactly zero gradient and are never read.
    """
    ops = _ops(backend, logits)
    b_idx, t_idx, y = _compact(targets, mask, logits.shape[-1])
    with torch.autocast(logits.device.type, enabled=False):
        logp = ops.token_logprobs(logits, b_idx, t_idx, y)
    return _scatter(logp, b_idx, t_idx, mask.shape)


def _compute_dtype(hidden, weight):
    """Inside autocast the LM head runs in the autocast dtype; outside, in the wider of the two input dtypes."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def linear_token_logprobs(hidden, weight, targets, mask, bias=None, backend=None):
    """log softmax(hidden[b, t] @ weight.T + bias)[targets[b, t]] where mask != 0, else 0, never forming [B, T, V].

    hidden [B, T, H] (any float dtype, may be non-contiguous), weight [V, H] (e.g. a tied embedding: its gradient
    is returned so autograd accumulates into the tie), bias [V] or None, targets [B, T] int, mask [B, T]
    bool/int/float 0-1; targets[b, t] is the token scored by hidden[b, t] (the caller shifts). Returns fp32
    [B, T] with autograd to hidden, weight and bias. Tiles are fp32 whatever the input dtype; the matmul
    operands are the autocast dtype inside autocast, else the wider of hidden's and weight's dtypes.
    """
    ops = _ops(backend, hidden)
    b_idx, t_idx, y = _compact(targets, mask, weight.shape[0])
    dtype = _compute_dtype(hidden, weight)
    h = hidden[b_idx, t_idx].to(dtype)  # [N, H] response tokens only; autograd scatters the gradient back
    weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        logp = ops.linear_logprobs(h, weight, bias, y)
    return _scatter(logp, b_idx, t_idx, mask.shape)

