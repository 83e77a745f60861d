"""Triton kernels for exact fp32 token log-probs: from logits, and fused with the LM head.

What you will learn here:
  * an online (streaming) log-sum-exp over vocabulary blocks, so a row of logits is read exactly once;
  * fusing the LM-head matmul with the log-softmax, so the [N, V] logits never reach memory;
  * splitting the vocabulary across programs and merging partial log-sum-exps (flash-decoding style);
  * a backward pass that recomputes logits tiles, forms dZ = g * (onehot - p) and hands the two big matmuls
    (dH = dZ W, dW = dZ^T H) to cuBLAS.

Why the naive path costs what it costs (N tokens, vocabulary V, hidden H; GPT-2 medium: N = 2048, V = 50257,
H = 1024, bf16, so one [N, V] buffer is 206 MB in bf16 and 412 MB in fp32):
    z = h @ W.T                 2NHV FLOPs; writes 206 MB
    z.float()                   reads 206 MB, writes 412 MB
    log_softmax(-1)             reads 412 MB twice (max, sum of exp), writes 412 MB (saved for the backward)
    gather backward             writes 412 MB (zeros, then g at the targets)
    log_softmax backward        reads 824 MB, writes 412 MB; the cast back to bf16 reads 412 MB, writes 206 MB
About 4.3 GB of traffic, ~1.4 ms at 3 TB/s: twice the 0.64 ms its three GEMMs (6NHV) take at the 798 TFLOP/s an
H100 reaches, with three logits-sized buffers alive at once, to produce N floats. The fused forward keeps each
logits tile in fp32 registers and writes 2 floats per token and vocabulary split; what reaches memory is the
GEMM's own operand traffic. Its backward spends 2NHV more FLOPs recomputing the tiles instead of storing them.

Triton on CPU (TRITON_INTERPRET=1, the tests): the interpreter reads TRITON_INTERPRET when `@triton.jit` runs, so
set it before importing this module; bf16 `tl.dot` is wrong there (bf16 is emulated as uint16), so operands
are upcast to fp32 (UPCAST); fp32 -> bf16 stores truncate, so gradients are stored in fp32 and cast by PyTorch;
autotuning needs a GPU, so the interpreter gets a single config.

Triton on GPUs, checked without one (python -m kernels.compile_check, tests/test_compile.py): every kernel and config
compiles for sm_75, sm_80, sm_86, sm_89 and sm_90, and the autotuner only tries configs that fit the device's shared
memory per block (64 KB on a T4, 99 KB on an RTX 3090/4090, A10 or L4, 163 KB on an A100, 227 KB on an H100).
"""
import contextlib
import functools

import torch
import triton
import triton.language as tl

from .torch_ops import amp_bwd, amp_fwd

INTERPRET = bool(triton.knobs.runtime.interpret)


def on_input_device(method):
    """Triton launches on the current CUDA device: make it the input's (for a model on cuda:1, say)."""
    @functools.wraps(method)
    def wrapper(ctx, x, *args):
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            return method(ctx, x, *args)
    return wrapper


# Bytes of dZ ([token chunk, V] in the input dtype) materialised at once in the linear backward.
DZ_BYTES = 256 * 2**20
# Vocabulary block of the logits kernels: a row of logits is streamed through registers in blocks this wide.
LOGITS_BLOCK_V = 16384 if INTERPRET else 4096
LOGITS_NUM_WARPS = 8


def _config(bn, bv, bk, warps, stages):
    return triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


if INTERPRET:  # few, large blocks: interpreter cost grows with the number of block operations
    _CONFIGS = [triton.Config({"BLOCK_N": 64, "BLOCK_V": 1024, "BLOCK_K": 128})]
    _CONFIGS_BY_ELEMENT_SIZE = {}
else:
    # The autotuner's configs (BLOCK_N, BLOCK_V, BLOCK_K, warps, stages) per operand size. For bf16/fp16, tiles with
    # BLOCK_K = 64. Those need 128-288 KB of shared memory with fp32 operands, more than the 99 KB of an RTX 3090/4090
    # or A10/L4, and their fp32 FMA ("ieee") code spills up to 33 KB per thread on sm_80: fp32 gets BLOCK_K = 32 tiles
    # of 48-96 KB that spill little or nothing (python -m kernels.compile_check; README, Kernels).
    _CONFIGS_BY_ELEMENT_SIZE = {
        2: [_config(128, 128, 64, 8, 3), _config(64, 128, 64, 4, 4), _config(128, 256, 64, 8, 3),
            _config(64, 256, 64, 8, 3)],
        4: [_config(64, 128, 32, 8, 3), _config(128, 128, 32, 8, 3)],
    }
    _CONFIGS = [c for configs in _CONFIGS_BY_ELEMENT_SIZE.values() for c in configs]


def shared_memory_bytes(config, element_size, capability):
    """An upper bound of the shared memory one block of the linear kernels needs on a GPU of this compute capability.

    Triton's software pipeliner keeps copies of the K loop's two operand tiles, h [BLOCK_N, BLOCK_K] and
    W [BLOCK_K, BLOCK_V], in shared memory: num_stages copies on sm_90, num_stages - 1 on sm_80-89 (cp.async).
    sm_75 has no asynchronous copies, so there is one copy, and the layout conversions of the fp32 logits tile
    after the loop (at most the whole tile) can need more. tests/test_compile.py checks this bound against the
    shared memory Triton's compiler reports for every kernel, config, dtype and architecture.
    """
    meta = config.kwargs
    stage = (meta["BLOCK_N"] + meta["BLOCK_V"]) * meta["BLOCK_K"] * element_size
    if capability[0] >= 9:
        return config.num_stages * stage
    if capability[0] == 8:
        return max(config.num_stages - 1, 1) * stage
    return max(stage, meta["BLOCK_N"] * meta["BLOCK_V"] * 4)


def fitting_configs(configs, element_size, capability, shared_limit):
    """The configs sized for this operand size whose shared memory (shared_memory_bytes) fits a block's limit; an
    error if none does."""
    sized = _CONFIGS_BY_ELEMENT_SIZE[element_size]
    fit = [c for c in configs if c in sized and shared_memory_bytes(c, element_size, capability) <= shared_limit]
    if not fit:
        raise RuntimeError(f"no kernel config fits {shared_limit} bytes of shared memory per block for "
                           f"{element_size}-byte operands on sm_{capability[0]}{capability[1]}")
    return fit


def _fitting_configs(configs, named_args, **kwargs):
    """early_config_prune: the autotuner benchmarks only the configs sized for the operands' dtype that fit the shared
    memory of the input's GPU (a config that does not fit fails its launch with OutOfResources)."""
    h = named_args["h_ptr"]
    device = h.device.index if h.device.index is not None else torch.cuda.current_device()
    limit = triton.runtime.driver.active.utils.get_device_properties(device)["max_shared_mem"]
    return fitting_configs(configs, h.element_size(), torch.cuda.get_device_capability(device), limit)


_PRUNE = None if INTERPRET else {"early_config_prune": _fitting_configs}


# ---------------------------------------------------------------------------------------------------------------
# 1. From logits: one program per response token, online log-sum-exp over vocabulary blocks.
#
#   forward   lse = log sum_v exp(z_v) computed as a running (max m, sum s):
#                 m' = max(m, max(z_block)),  s' = s * exp(m - m') + sum(exp(z_block - m')),  lse = m + log s
#             logp = z_y - lse
#   backward  dz_v = g * (1[v = y] - exp(z_v - lse)), one program per (token, vocabulary block)
# Traffic: the forward reads each response row once (N*V*b bytes) and writes 2 floats per token; the backward
# reads it again and writes the gradient. Masked rows are never read (the [B, T, V] gradient is zero there).
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _logits_fwd_kernel(z_ptr, b_idx_ptr, t_idx_ptr, y_ptr, lse_ptr, logp_ptr, V, stride_b, stride_t, stride_v,
                       BLOCK_V: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    row = z_ptr + tl.load(b_idx_ptr + n) * stride_b + tl.load(t_idx_ptr + n) * stride_t  # int64 offsets
    m = float("-inf")
    s = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)  # int64: cols * stride_v cannot overflow
        z = tl.load(row + cols * stride_v, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))  # finite: every block holds at least one real column
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    z_y = tl.load(row + tl.load(y_ptr + n) * stride_v).to(tl.float32)
    tl.store(lse_ptr + n, lse)
    tl.store(logp_ptr + n, z_y - lse)


@triton.jit
def _logits_bwd_kernel(z_ptr, dz_ptr, b_idx_ptr, t_idx_ptr, y_ptr, lse_ptr, g_ptr, V, stride_b, stride_t,
                       stride_v, dstride_b, dstride_t, BLOCK_V: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    b = tl.load(b_idx_ptr + n)
    t = tl.load(t_idx_ptr + n)
    z = tl.load(z_ptr + b * stride_b + t * stride_t + cols * stride_v, mask=cols < V, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + n)
    # g * (onehot - p) is formed in fp32: at the target, 1 - p would cancel if rounded to bf16 first.
    dz = g * (tl.where(cols == tl.load(y_ptr + n), 1.0, 0.0) - tl.exp(z - tl.load(lse_ptr + n)))
    tl.store(dz_ptr + b * dstride_b + t * dstride_t + cols, dz.to(dz_ptr.dtype.element_ty), mask=cols < V)


class TokenLogprobs(torch.autograd.Function):
    @staticmethod
    @amp_fwd
    @on_input_device
    def forward(ctx, logits, b_idx, t_idx, y):
        n, V = y.shape[0], logits.shape[-1]
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        logp = torch.empty_like(lse)
        if n:
            block = min(LOGITS_BLOCK_V, triton.next_power_of_2(V))
            _logits_fwd_kernel[(n,)](logits, b_idx, t_idx, y, lse, logp, V, *logits.stride(), BLOCK_V=block,
                                     num_warps=LOGITS_NUM_WARPS)
        ctx.save_for_backward(logits, b_idx, t_idx, y, lse)
        return logp

    @staticmethod
    @amp_bwd
    @on_input_device
    def backward(ctx, g):
        logits, b_idx, t_idx, y, lse = ctx.saved_tensors
        n, V = y.shape[0], logits.shape[-1]
        grad = torch.zeros(logits.shape, dtype=torch.float32 if INTERPRET else logits.dtype, device=logits.device)
        if n:
            block = min(LOGITS_BLOCK_V, triton.next_power_of_2(V))
            _logits_bwd_kernel[(n, triton.cdiv(V, block))](
                logits, grad, b_idx, t_idx, y, lse, g.float().contiguous(), V, *logits.stride(), grad.stride(0),
                grad.stride(1), BLOCK_V=block, num_warps=LOGITS_NUM_WARPS)
        return grad.to(logits.dtype), None, None, None


def token_logprobs(logits, b_idx, t_idx, y):
    """fp32 log-probs of the targets y at rows (b_idx, t_idx) of logits [B, T, V]."""
    return TokenLogprobs.apply(logits, b_idx, t_idx, y)


# ---------------------------------------------------------------------------------------------------------------
# 2. Fused with the LM head. A tile of logits z[rows, cols] = h[rows] W[cols]^T + b[cols] is accumulated in fp32
#    by tl.dot over BLOCK_K-wide slices of H and never stored.
#
#   forward   grid (token blocks, vocabulary splits). Each program walks its share of the vocabulary tile by
#             tile, keeping a running (max, sum) per row and picking z_y when the target falls in the tile; it
#             writes the split's partial lse_s and z_y. PyTorch merges: lse = logsumexp_s lse_s, z_y = sum_s.
#             FLOPs 2NHV. With a few thousand tokens there are only tens of token blocks: the splits bring the
#             grid to about twice the number of SMs.
#   backward  grid (token blocks, vocabulary tiles): recompute the tile (2NHV), store
#             dZ = g * (onehot - exp(z - lse)) in the input dtype, then dH = dZ W and dW = dZ^T H as cuBLAS
#             GEMMs with fp32 accumulation (4NHV). dZ is materialised per token chunk of DZ_BYTES.
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_V] tile of h[rows] @ W[cols]^T + b[cols]."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < H),
                    other=0.0)
        b = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None], mask=col_ok[None, :] & (ks[:, None] < H),
                    other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.autotune(configs=_CONFIGS, key=["H", "V"], prune_configs_by=_PRUNE)
@triton.jit
def _linear_fwd_kernel(h_ptr, w_ptr, b_ptr, y_ptr, lse_part_ptr, zy_part_ptr, N, V, H, stride_h, stride_w, SPLITS,
                       HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    split = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    tiles_per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), SPLITS)
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(V, v_begin + tiles_per_split * BLOCK_V)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_y = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):  # an empty range leaves lse_s = -inf, z_y = 0: neutral in the merge
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)  # W's row offsets reach V * H > 2**31
        col_ok = cols < V
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w, HAS_BIAS, BLOCK_N,
                         BLOCK_V, BLOCK_K, UPCAST, PRECISION)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        z_y += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
    # s >= 1 once a tile was seen (its maximum contributes exp(0)); an empty split keeps m = -inf, and
    # max(s, 1) spares it a log(0).
    tl.store(lse_part_ptr + split * N + rows, m + tl.log(tl.maximum(s, 1.0)), mask=row_ok)
    tl.store(zy_part_ptr + split * N + rows, z_y, mask=row_ok)


@triton.autotune(configs=_CONFIGS, key=["H", "V"], prune_configs_by=_PRUNE)
@triton.jit
def _linear_dz_kernel(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr, dz_ptr, N, V, H, stride_h, stride_w,
                      HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w, HAS_BIAS, BLOCK_N,
                     BLOCK_V, BLOCK_K, UPCAST, PRECISION)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    dz = g[:, None] * (tl.where(cols[None, :] == y[:, None], 1.0, 0.0) - tl.exp(z - lse[:, None]))
    tl.store(dz_ptr + rows[:, None] * V + cols[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _dot_precision(dtype):
    # fp32 tl.dot defaults to TF32 on GPUs; follow PyTorch's matmul precision setting instead.
    return "ieee" if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest" else "tf32"


def _default_splits(n, V, device):
    """Vocabulary splits so that (token blocks x splits) covers the GPU about twice; 1 under the interpreter."""
    if INTERPRET:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(V, 1024), triton.cdiv(2 * sms, triton.cdiv(n, 128))))


class LinearLogprobs(torch.autograd.Function):
    @staticmethod
    @amp_fwd
    @on_input_device
    def forward(ctx, h, weight, bias, y, splits, chunk_tokens):
        n, H = h.shape
        V = weight.shape[0]
        weight = weight.contiguous()
        splits = splits or _default_splits(n, V, h.device)
        lse_part = torch.empty((splits, n), dtype=torch.float32, device=h.device)
        zy_part = torch.empty_like(lse_part)
        if n:
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)
            _linear_fwd_kernel[grid](h, weight, h if bias is None else bias, y, lse_part, zy_part, n, V, H,
                                     h.stride(0), weight.stride(0), splits, HAS_BIAS=bias is not None,
                                     UPCAST=INTERPRET, PRECISION=_dot_precision(h.dtype))
        lse = torch.logsumexp(lse_part, dim=0)
        ctx.save_for_backward(h, weight, bias, y, lse)
        ctx.chunk_tokens = chunk_tokens
        return zy_part.sum(dim=0) - lse

    @staticmethod
    @amp_bwd
    @on_input_device
    def backward(ctx, g):
        h, weight, bias, y, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        (n, H), V = h.shape, weight.shape[0]
        g = g.float().contiguous()
        chunk = ctx.chunk_tokens or max(1, DZ_BYTES // (V * h.element_size()))
        dh = torch.empty_like(h) if need_h else None
        dw = db = None
        for i in range(0, n, chunk):
            j = min(i + chunk, n)
            # The interpreter truncates fp32 -> bf16 stores: keep dZ fp32 there and let PyTorch round it.
            dz = torch.empty((j - i, V), dtype=torch.float32 if INTERPRET else h.dtype, device=h.device)
            grid = lambda meta: (triton.cdiv(j - i, meta["BLOCK_N"]), triton.cdiv(V, meta["BLOCK_V"]))
            _linear_dz_kernel[grid](h[i:j], weight, h if bias is None else bias, y[i:j], lse[i:j], g[i:j], dz, j - i,
                                    V, H, h.stride(0), weight.stride(0), HAS_BIAS=bias is not None,
                                    UPCAST=INTERPRET, PRECISION=_dot_precision(h.dtype))
            dz = dz.to(h.dtype)
            if need_h:
                torch.mm(dz, weight, out=dh[i:j])
            if need_w:  # each chunk's product is in the input dtype; several chunks accumulate in fp32
                part = dz.T @ h[i:j]
                dw = part if dw is None else dw.float().add_(part)
            if need_b:
                part = dz.sum(dim=0, dtype=torch.float32)
                db = part if db is None else db.add_(part)
        if n == 0:  # no response token at all: zero gradients
            dw = torch.zeros_like(weight) if need_w else None
            db = torch.zeros_like(bias) if need_b else None
        return (dh, dw.to(weight.dtype) if need_w else None, db.to(bias.dtype) if need_b else None, None, None, None)


def linear_logprobs(h, weight, bias, y, splits=None, chunk_tokens=None):
    """fp32 log-probs of the targets y under logits h @ W.T + b, for compacted h [N, H]; logits never stored."""
    return LinearLogprobs.apply(h, weight, bias, y, splits, chunk_tokens)
