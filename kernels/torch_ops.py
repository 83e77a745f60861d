"""Chunked PyTorch log-probs: the CPU fallback, with the same semantics as the Triton kernels.

What you will learn here:
  * why `log_softmax(logits).gather(targets)` costs gigabytes, and how an online log-sum-exp over vocabulary
    chunks brings the extra memory down to one tile;
  * how to recompute logits in the backward pass instead of storing them;
  * how to split the gradient of a log-prob into a dense softmax part and a sparse one-hot part.

The naive path (the official A-LoL code) for N tokens, vocabulary V and hidden size H, in fp32:
    z = h @ W.T                       write N*V        (412 MB for N = 2048, V = 50257)
    logp = log_softmax(z)             read N*V (twice: max, sum-exp), write N*V    (saved for backward)
    logp.gather(targets)              read N
  backward:
    scatter g into zeros              write N*V
    softmax backward                  read 2*N*V, write N*V
    dH = dZ @ W, dW = dZ.T @ h        read N*V twice
so at least three N*V fp32 buffers are alive together, for a result of N floats. Here the working memory is one
[chunk_tokens, chunk_vocab] fp32 tile and one vocabulary chunk of W (and of dW) in fp32, and every FLOP is spent on
response tokens only (the caller compacts them).

Maths (per token n, logits z = W h_n + b, target y_n, upstream gradient g_n):
    lse_n  = log sum_v exp(z_v)                      online over vocab chunks: lse <- logaddexp(lse, lse_chunk)
    logp_n = z_{y_n} - lse_n
    dlogp_n / dz_v = 1[v = y_n] - p_v,  p = softmax(z) = exp(z - lse_n)
    dz = g_n * (onehot(y_n) - p)  ->  dh_n = dz @ W,  dW += dz^T h_n,  db += dz
The dense part -g*p needs the logits again (recomputed chunk by chunk from h, W and the saved lse); the
sparse part +g*onehot(y) is added into the tile that holds each target, so the two GEMMs see the whole dz.
"""
import contextlib

import torch

# Budget for one fp32 logits tile. The linear path's working memory is this tile plus an fp32 copy of a weight chunk
# (and of its dW slice, for bf16 weights) of about the same size: about 50 MB at DialoGPT-medium's shape, where
# each GEMM ([1440, H] x [H, 2900]) still runs at full BLAS speed (kernels/bench.py: 32 MiB was no faster).
TILE_BYTES = 16 * 2**20
# Token chunks this long make the dW update a rank-4096 GEMM: a vocabulary chunk's fp32 dW accumulator is read and
# written once per token chunk, so fewer, longer chunks mean less memory traffic.
MAX_CHUNK_TOKENS = 4096

# The public functions run these autograd Functions with autocast off. custom_fwd/custom_bwd replay that state in
# the backward, so a backward() called inside a CUDA autocast region cannot turn fp32 GEMMs into bf16 ones.
amp_fwd = torch.amp.custom_fwd(device_type="cuda")
amp_bwd = torch.amp.custom_bwd(device_type="cuda")


def _spans(n, size):
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def _acc_dtype(dtype):
    """fp32 accumulation for fp32/fp16/bf16 inputs; fp64 inputs (gradcheck) stay fp64."""
    return torch.promote_types(dtype, torch.float32)


class TokenLogprobs(torch.autograd.Function):
    """logp[n] = log_softmax(logits[b_idx[n], t_idx[n]])[y[n]], reading only the listed rows."""

    @staticmethod
    @amp_fwd
    def forward(ctx, logits, b_idx, t_idx, y, chunk_rows):
        acc = _acc_dtype(logits.dtype)
        lse = torch.empty(y.shape[0], dtype=acc, device=logits.device)
        logp = torch.empty_like(lse)
        for i, j in _spans(y.shape[0], chunk_rows):
            z = logits[b_idx[i:j], t_idx[i:j]].to(acc)  # [C, V]: the only logits-sized buffer, one chunk
            lse[i:j] = torch.logsumexp(z, dim=-1)
            logp[i:j] = z.gather(1, y[i:j, None]).squeeze(1) - lse[i:j]
        ctx.save_for_backward(logits, b_idx, t_idx, y, lse)
        ctx.chunk_rows = chunk_rows
        return logp

    @staticmethod
    @amp_bwd
    def backward(ctx, g):
        logits, b_idx, t_idx, y, lse = ctx.saved_tensors
        # Autograd wants a full [B, T, V] gradient; rows outside the mask are zero.
        grad = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
        g = g.to(lse.dtype)
        for i, j in _spans(y.shape[0], ctx.chunk_rows):
            dz = logits[b_idx[i:j], t_idx[i:j]].to(lse.dtype)
            dz.sub_(lse[i:j, None]).exp_().mul_(-g[i:j, None])  # -g * p, in place on the recomputed chunk
            dz.scatter_add_(1, y[i:j, None], g[i:j, None])  # + g at the target, in fp32 before any rounding
            grad[b_idx[i:j], t_idx[i:j]] = dz.to(grad.dtype)
        return grad, None, None, None, None


def _logits_chunk(h, w, bias, v0, v1):
    """z = h @ w.T + b[v0:v1], with w = W[v0:v1] already in h's (accumulation) dtype."""
    if bias is None:
        return h @ w.T
    return torch.addmm(bias[v0:v1].to(h.dtype), h, w.T)


@contextlib.contextmanager
def _gemm_precision(dtype):
    """For bf16 inputs, let the fp32 GEMMs round their operands to bf16 and accumulate in fp32
    (float32_matmul_precision "medium": oneDNN on CPUs with bf16 units, TF32 on GPUs; elsewhere plain fp32).
    At DialoGPT-medium's shape this is about 2x faster than IEEE fp32 on a CPU with AMX. The logits stay exact: h
    and W hold bf16 values, which that rounding leaves unchanged. Only dz is rounded on its way into the dH and dW
    GEMMs, as the Triton backward stores it in bf16. Other input dtypes keep the caller's setting. The setting is
    process-wide while the loops run, and restored after them."""
    if dtype != torch.bfloat16:
        yield
        return
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


class LinearLogprobs(torch.autograd.Function):
    """logp[n] = log_softmax(h[n] @ W.T + b)[y[n]] without the [N, V] logits: token x vocab tiles."""

    @staticmethod
    @amp_fwd
    def forward(ctx, h, weight, bias, y, chunk_tokens, chunk_vocab):
        acc = _acc_dtype(h.dtype)
        lse = torch.full((h.shape[0],), -torch.inf, dtype=acc, device=h.device)
        h_acc = h.to(acc)  # [N, H]
        with _gemm_precision(h.dtype):
            for v0, v1 in _spans(weight.shape[0], chunk_vocab):
                w = weight[v0:v1].to(acc)  # [Cv, H]
                for i, j in _spans(h.shape[0], chunk_tokens):
                    z = _logits_chunk(h_acc[i:j], w, bias, v0, v1)  # [Ct, Cv] fp32 tile
                    zmax = z.amax(dim=1)
                    chunk_lse = zmax + z.sub_(zmax[:, None]).exp_().sum(dim=1).log()  # in place: no second tile
                    lse[i:j] = torch.logaddexp(lse[i:j], chunk_lse)
        # The target logit is one dot product per token; no need to find it inside the tiles.
        target = (h_acc * weight[y].to(acc)).sum(dim=1)
        if bias is not None:
            target += bias[y].to(acc)
        ctx.save_for_backward(h, weight, bias, y, lse)
        ctx.chunks = chunk_tokens, chunk_vocab
        return target - lse

    @staticmethod
    @amp_bwd
    def backward(ctx, g):
        h, weight, bias, y, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        chunk_tokens, chunk_vocab = ctx.chunks
        if not h.shape[0]:  # no response token: every gradient is zero
            return (torch.zeros_like(h) if need_h else None, torch.zeros_like(weight) if need_w else None,
                    torch.zeros_like(bias) if need_b else None, None, None, None)
        acc, g = lse.dtype, g.to(lse.dtype)
        h_acc = h.to(acc)  # [N, H]
        dh = torch.zeros(h.shape, dtype=acc, device=h.device) if need_h else None
        # Vocabulary chunks outside, token chunks inside: each slice dW[v0:v1] is complete when its chunk ends, so
        # it is written once in the weight's dtype and the only fp32 dW buffer is one chunk (a bf16 model never
        # holds a V x H fp32 copy). An fp32 slice is its own accumulator.
        dw = torch.empty(weight.shape, dtype=weight.dtype, device=h.device) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=acc, device=h.device) if need_b else None
        with _gemm_precision(h.dtype):
            for v0, v1 in _spans(weight.shape[0], chunk_vocab):
                w = weight[v0:v1].to(acc)  # [Cv, H]
                dw_c = None
                if need_w:
                    dw_c = dw[v0:v1] if dw.dtype == acc else torch.empty(w.shape, dtype=acc, device=h.device)
                for i, j in _spans(h.shape[0], chunk_tokens):
                    yc, gc = y[i:j], g[i:j]
                    # dz = g * (onehot(y) - p): -g * p with p recomputed from h, W and the saved lse, then +g at
                    # the targets that fall in this chunk, in fp32 before any rounding. One write per token, so the
                    # result is bitwise reproducible (CPU index_put_(accumulate=True) is not: its thread order varies).
                    dz = _logits_chunk(h_acc[i:j], w, bias, v0, v1).sub_(lse[i:j, None]).exp_().mul_(-gc[:, None])
                    rows = ((yc >= v0) & (yc < v1)).nonzero().squeeze(1)
                    dz[rows, yc[rows] - v0] += gc[rows]
                    if need_h:
                        dh[i:j].addmm_(dz, w)
                    if dw_c is not None:
                        # beta=0 on the first token chunk: the GEMM overwrites uninitialised memory, no zero-fill.
                        dw_c.addmm_(dz.T, h_acc[i:j], beta=0 if i == 0 else 1)
                    if need_b:
                        db[v0:v1] += dz.sum(dim=0)
                if dw_c is not None and dw_c.dtype != dw.dtype:
                    dw[v0:v1] = dw_c
        return (dh.to(h.dtype) if need_h else None, dw, db.to(bias.dtype) if need_b else None, None, None, None)


def token_logprobs(logits, b_idx, t_idx, y, chunk_rows=None):
    """fp32 log-probs of the targets y at rows (b_idx, t_idx) of logits [B, T, V], in row chunks."""
    chunk_rows = chunk_rows or max(1, TILE_BYTES // (4 * logits.shape[-1]))
    return TokenLogprobs.apply(logits, b_idx, t_idx, y, chunk_rows)


def linear_logprobs(h, weight, bias, y, chunk_tokens=None, chunk_vocab=None):
    """fp32 log-probs of the targets y under logits h @ W.T + b, for compacted h [N, H], in tiles."""
    chunk_tokens = chunk_tokens or max(1, min(h.shape[0], MAX_CHUNK_TOKENS))
    chunk_vocab = chunk_vocab or max(128, TILE_BYTES // (4 * chunk_tokens))
    return LinearLogprobs.apply(h, weight, bias, y, chunk_tokens, chunk_vocab)
