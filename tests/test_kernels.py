"""kernels/: every backend against an fp64 reference written here, the A-LoL loss on their log-probs (the one copy of
it, alol.py's alol_loss, fed by the kernels), gradcheck.

On a CPU the Triton kernels run under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before `kernels` is
imported); only the CUDA section skips there.
"""
import math
import pathlib
import subprocess
import sys

import pytest
import torch

import alol
import kernels
from kernels import torch_ops, triton_ops

# "triton" on CPU tensors needs the interpreter; on a machine with CUDA tests/conftest.py leaves it off, and the CUDA
# section runs the Triton kernels compiled for the GPU instead.
BACKENDS = ["torch", pytest.param("triton", marks=[
    pytest.mark.skipif(triton_ops is None, reason="no triton"),
    pytest.mark.skipif(triton_ops is not None and not triton_ops.INTERPRET,
                       reason="CUDA machine: Triton runs compiled, in the CUDA tests, not interpreted on CPU")])]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(3, 17, 72, 1000), (4, 47, 31, 123), (2, 64, 128, 4099)]  # (B, T, H, V): odd H, V below a block, prime-ish V

# Inputs are rounded to the dtype first and the fp64 reference sees the rounded values, so the log-probs carry only
# the kernels' fp32 arithmetic error, whatever the input dtype. logp = z_y - lse, u = 2^-24. A length-n fp32 sum with
# independent roundings errs by u/sqrt(3) * sqrt(sum of its squared partial sums) (one standard deviation; Higham and
# Mary, SIAM J. Sci. Comput. 2019). At the largest test shape (H = 128, V = 4099, logits of std 2): a logit's dot
# product (terms of rms 2/sqrt(H), partial sums of rms sqrt(2 H) at the end) errs by u * sqrt(2H/3) ~ 9u; the
# log-sum-exp's sum of V exponentials (partial sums growing linearly to the total) by a relative u * sqrt(V) / 3
# ~ 21u; adding the max (|lse| ~ 10) by 10u. Together sqrt(2 * 9^2 + 21^2 + 10^2) u ~ 27u = 1.6e-6 per token; the
# bound is 6 standard deviations, wherever the BLAS or the thread count puts the roundings.
LOGP_ATOL = 1e-5
U32 = 2.0 ** -24  # fp32 unit roundoff
# Gradients come back in the input dtype, and the Triton backward feeds dZ in that dtype to the GEMMs: allow two
# units of the dtype's rounding, relative to the largest reference gradient entry.
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 2 * torch.finfo(torch.float16).eps,
             torch.bfloat16: 2 * torch.finfo(torch.bfloat16).eps}


# ---- fp64 reference -------------------------------------------------------------------------------------------
def ref_token_logprobs(logits, targets, mask):
    """log_softmax + gather in float64; 0 where mask == 0 (masked targets may be out of range)."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    logp = logp.gather(-1, targets.clamp(0, logits.shape[-1] - 1)[..., None]).squeeze(-1)
    return torch.where(mask != 0, logp, torch.zeros_like(logp))


def ref_alol_loss(seq_logp, weight, adv):
    """-(1/B) sum_b w_b A+_b S_b with the weights given (constants)."""
    return -(weight.double() * adv.double().clamp(min=0) * seq_logp).mean()


def a_lol(logp, ref_logp, mask, adv, clip_eps=0.9, return_stats=False):
    """alol.alol_loss(algo="a_lol") with advantage adv: reward = adv, value = 0, so reward - value is adv exactly."""
    return alol.alol_loss(logp, ref_logp, mask, adv, torch.zeros_like(adv), algo="a_lol", clip_eps=clip_eps,
                          return_stats=return_stats)


def spread(seq_values, mask):
    """[B] -> [B, T]: each row's value split evenly over its masked-in tokens, 0 elsewhere (and in a row without any).

    alol_loss reads ref_logp only through sum_t m_bt (logp_bt - ref_logp_bt) = S_b - sum_t m_bt ref_logp_bt, so a
    token-level ref_logp = spread(Sref, mask) is, for the loss, the same as a sequence-level reference Sref_b; a fully
    masked row's log-ratio is a sum of nothing, exactly 0, whatever Sref_b."""
    n = (mask != 0).sum(1, keepdim=True).clamp(min=1)
    return torch.where(mask != 0, seq_values[:, None] / n, torch.zeros((), dtype=seq_values.dtype))


def make_case(B, T, H, V, dtype=torch.float32, seed=0, bias=True, masked_row=True):
    """Random hidden/weight/bias/targets/mask, rounded to dtype; targets at 0, V-1 and block edges; logits std ~2."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (2 / math.sqrt(H) * torch.randn(V, H, generator=g)).to(dtype)
    b = (0.5 * torch.randn(V, generator=g)).to(dtype) if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.7
    if masked_row:
        mask[1] = False  # a fully masked sequence
    edges = [0, V - 1] + [e for e in (127, 128, 255, 256, 1023, 1024, 2047, 2048, 4095, 4096) if e < V]
    targets.view(-1)[mask.view(-1).nonzero()[:len(edges), 0]] = torch.tensor(edges)
    return hidden, weight, b, targets, mask


def logits_of(hidden, weight, bias):
    z = hidden.double() @ weight.double().T
    return (z if bias is None else z + bias.double()).to(hidden.dtype)


def leaf(x, dtype=None):
    return None if x is None else x.detach().to(dtype or x.dtype).requires_grad_()


def seq_logp_error_bound(ref_logp, mask):
    """Bound on |c_b S_b - c_b S_b exact| / c_b, where alol_loss forms c_b S_b as the fp32 row sum of c_b * logp_bt
    (c_b = w_b A+_b) over the kernels' fp32 log-probs: each masked-in token errs by at most LOGP_ATOL; each product
    c_b * logp_bt is rounded once, by u |c_b logp_bt|; and an fp32 sum of T terms in any order errs by at most
    (T - 1) u sum_t |x_t| (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., eq. 4.4). Together
    n_b LOGP_ATOL + T u sum_t |logp_bt|: T u, not the (T - 1) u of a plain sum of log-probs, for the one rounding
    per product. Worst case: no cancellation assumed."""
    T = mask.shape[1]
    return (mask != 0).sum(1) * LOGP_ATOL + T * U32 * ref_logp.abs().sum(1)


def log_ratio_error_bound(ref_diff, mask):
    """Bound on |lr_b - lr_b exact| for alol_loss's log-ratio lr_b = sum_t (logp_bt - ref_logp_bt), summed in fp32
    from the kernels' log-probs and an fp32 ref_logp that the fp64 reference reads too (so ref_logp carries no
    error): each logp_bt errs by at most LOGP_ATOL, each difference d_bt is rounded once (u |d_bt|), and the fp32 row
    sum errs by at most (T - 1) u sum_t |d_bt| (eq. 4.4). Together n_b LOGP_ATOL + T u sum_t |d_bt|, with the
    computed |d_bt| at most |exact d_bt| + LOGP_ATOL. ref_diff = exact logp - ref_logp, [B, T], 0 outside the mask.
    The differences are small (the log-ratio spread over the row), so the T u term is far below S_b's."""
    T, m = mask.shape[1], mask != 0
    return m.sum(1) * LOGP_ATOL + T * U32 * (ref_diff.abs() + LOGP_ATOL * m).sum(1)


def assert_grad_close(got, ref, dtype, rtol=None):
    """|got - ref| <= rtol * max|ref| elementwise, rtol = GRAD_RTOL[dtype] unless given."""
    rtol = rtol or GRAD_RTOL[dtype]
    assert torch.isfinite(got).all()
    err = (got.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rtol * scale, f"max |error| {err:.3g} > {rtol:.3g} * {scale:.3g}"


# ---- forward and gradients against fp64 ------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_token_logprobs_matches_fp64(shape, dtype, backend):
    hidden, weight, bias, targets, mask = make_case(*shape, dtype)
    logits = leaf(logits_of(hidden, weight, bias))
    out = kernels.token_logprobs(logits, targets, mask, backend=backend)
    ref_logits = leaf(logits, torch.float64)
    ref = ref_token_logprobs(ref_logits, targets, mask)
    grad_out = torch.randn(mask.shape)  # != 1, and nonzero at masked positions too
    (out * grad_out).sum().backward()
    (ref * grad_out).sum().backward()
    assert out.dtype == torch.float32 and out.shape == mask.shape
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=LOGP_ATOL)
    assert logits.grad.dtype == dtype
    assert_grad_close(logits.grad, ref_logits.grad, dtype)
    assert (logits.grad[~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_linear_token_logprobs_matches_fp64(shape, dtype, backend):
    hidden, weight, bias, targets, mask = make_case(*shape, dtype, bias=shape[-1] != 123)  # one case without bias
    h, w, b = leaf(hidden), leaf(weight), leaf(bias)
    out = kernels.linear_token_logprobs(h, w, targets, mask, bias=b, backend=backend)
    h64, w64, b64 = leaf(hidden, torch.float64), leaf(weight, torch.float64), leaf(bias, torch.float64)
    ref = ref_token_logprobs(logits_of(h64, w64, b64), targets, mask)
    grad_out = torch.randn(mask.shape)
    (out * grad_out).sum().backward()
    (ref * grad_out).sum().backward()
    assert out.dtype == torch.float32 and out.shape == mask.shape
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=LOGP_ATOL)
    for got, want in [(h, h64), (w, w64)] + ([(b, b64)] if bias is not None else []):
        assert got.grad.dtype == dtype
        assert_grad_close(got.grad, want.grad, dtype)
    assert (h.grad[~mask] == 0).all()


def seq_offsets_case(dtype):
    """B=4 with sequence 1 fully masked; log-ratios S - Sref of -1, 0, 0.1, 1 put sequences 0 and 3 outside the
    clip range [log 0.8, log 1.2] (eps = 0.2), sequences 1 and 2 inside. Sequence 1 has no response token: its
    token-level log-ratio is a sum of nothing, exactly 0, so its offset is 0."""
    hidden, weight, bias, targets, mask = make_case(4, 47, 31, 123, dtype)
    offsets = torch.tensor([-1.0, 0.0, 0.1, 1.0], dtype=torch.float64)
    adv = torch.tensor([0.7, 2.0, 1.3, 0.9])
    return hidden, weight, bias, targets, mask, offsets, adv


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", ["logits", "hidden"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_alol_loss_on_kernel_logprobs_matches_fp64(dtype, source, backend):
    """The kernels' log-probs, then alol_loss(algo="a_lol"), against the same loss on fp64 log-probs."""
    hidden, weight, bias, targets, mask, offsets, adv = seq_offsets_case(dtype)
    eps = 0.2
    if source == "logits":
        params = [leaf(logits_of(hidden, weight, bias))]
        ref_params = [leaf(params[0], torch.float64)]
        ref_logp = ref_token_logprobs(ref_params[0], targets, mask)
        logp = kernels.token_logprobs(params[0], targets, mask, backend=backend)
    else:
        params = [leaf(hidden), leaf(weight), leaf(bias)]
        ref_params = [leaf(p, torch.float64) for p in params]
        ref_logp = ref_token_logprobs(logits_of(*ref_params), targets, mask)
        logp = kernels.linear_token_logprobs(params[0], params[1], targets, mask, bias=params[2], backend=backend)
    s_ref = ref_logp.sum(1)
    # The reference policy's token log-probs: the exact ones minus each row's offset spread over its response tokens
    # (spread()), so Sref_b = S_b - offset_b; rounded to fp32, and the fp64 reference reads the same rounded values.
    ref_tokens = (ref_logp.detach() - spread(offsets, mask)).float()
    loss, stats = a_lol(logp, ref_tokens, mask, adv, clip_eps=eps, return_stats=True)
    log_ratio = s_ref.detach() - ref_tokens.double().sum(1)  # = offsets, up to the rounding of ref_tokens
    weights = torch.exp(log_ratio).clamp(1 - eps, 1 + eps)  # ~[0.8, 1, e^0.1, 1.2]
    inside = (log_ratio > math.log(1 - eps)) & (log_ratio < math.log(1 + eps))
    assert inside.tolist() == [False, True, True, False]  # offsets far from the edges: the clip decisions are exact
    ref = ref_alol_loss(s_ref, weights, adv)
    # alol_loss sums c_b * logp_bt over the row, c_b = w_b A+_b: within c_b ds_b of c_b S_b exact
    # (seq_logp_error_bound). w_b = exp(lr_b) follows its log-ratio lr_b = sum_t (logp_bt - ref_bt) inside the clip
    # range, and lr_b is within dlr_b of the exact one (log_ratio_error_bound). So the loss
    # -(1/B) sum_b w_b A+_b S_b moves by at most (1/B) sum_b A+_b w_b (ds_b + |S_b| dlr_b [inside]), plus the fp32
    # rounding of its own few operations (exp, products, mean: 16 u |loss|). The sequence-level copy of the loss that
    # kernels/ used to carry formed S_b - Sref_b, a difference of two row sums, so ds_b stood in for dlr_b there;
    # alol_loss sums the small token differences instead (here dlr_b < ds_b).
    ds = seq_logp_error_bound(ref_logp.detach(), mask)
    dlr = log_ratio_error_bound(ref_logp.detach() - ref_tokens.double(), mask)
    loss_bound = (adv.double().clamp(min=0) * weights * (ds + s_ref.detach().abs() * dlr * inside)).mean()
    assert abs(loss.item() - ref.item()) <= loss_bound.item() + 16 * U32 * abs(ref.item())
    assert stats["clip_frac"] == pytest.approx(2 / 4)  # sequences 0 and 3
    ratio_bound = (weights * inside * dlr).mean().item() + 16 * U32 * weights.mean().item()
    assert abs(stats["ratio"] - weights.mean().item()) <= ratio_bound
    # The gradient takes w_b as a constant (detached), computed from the kernels' own log-probs: the fp64 reference
    # uses the same constants (the fp32 log-ratio formed as alol_loss forms it), so only the log-probs' gradients
    # are compared.
    kernel_log_ratio = (logp.detach() - ref_tokens).sum(1).double()
    kernel_weights = kernel_log_ratio.clamp(math.log(1 - eps), math.log1p(eps)).exp()
    (3.7 * loss).backward()  # grad_output != 1
    (3.7 * ref_alol_loss(s_ref, kernel_weights, adv)).backward()
    for got, want in zip(params, ref_params):
        assert_grad_close(got.grad, want.grad, dtype)


def test_alol_test_vectors():
    """The hand-computed A-LoL vectors (tests/test_alol.py), fed through per-token logits and the kernels into
    alol_loss: with V = 2, logits (a, 0) and target 0 give log p = -log(1 + e^-a), so a = log(p / (1 - p))
    reproduces any token log-prob."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.0, -5.0], [-2.0, -1.0, -1.0]], dtype=torch.float64)
    ref_logp = torch.tensor([[-1.2, -2.5, -0.4], [-1.5, -2.0, -0.7], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    reward, value = torch.tensor([3.2, 2.0, 1.0]), torch.tensor([2.9, 1.5, 1.8])
    p = logp.exp()
    logits = torch.stack([torch.log(p / (1 - p)), torch.zeros_like(p)], dim=-1).float()  # [3, 3, 2]
    targets = torch.zeros(3, 3, dtype=torch.long)
    # d loss / d logp_bt = -w_b A+_b / B on the response tokens: at eps = 0.9, row 0 is -1.822119 * 0.3 / 3, row 1
    # -1.9 * 0.5 / 3 (clipped), row 2 0 (A+ = 0). d logp_bt / d a_bt = 1 - p_bt, and d logp_bt / d (logit 1) is minus
    # that, so the logits' gradient is (+-) d loss / d logp_bt * (1 - p_bt).
    dlogp = torch.tensor([-0.182212, -0.316667, 0.0], dtype=torch.float64)[:, None] * mask
    want_grad = torch.stack([dlogp * (1 - p), -dlogp * (1 - p)], dim=-1)
    for backend in ["torch"] + (["triton"] if triton_ops and triton_ops.INTERPRET else []):
        for eps, expected in [(0.9, 1.049408), (0.2, 0.680000), (None, 2.593161)]:
            z, h = leaf(logits), leaf(logits)
            from_logits = alol.alol_loss(kernels.token_logprobs(z, targets, mask, backend=backend), ref_logp, mask,
                                         reward, value, algo="a_lol", clip_eps=eps)
            # hidden = logits and an identity head give the same logits through the fused linear path
            from_hidden = alol.alol_loss(kernels.linear_token_logprobs(h, torch.eye(2), targets, mask,
                                                                       backend=backend),
                                         ref_logp, mask, reward, value, algo="a_lol", clip_eps=eps)
            assert from_logits.item() == pytest.approx(expected, abs=2e-6)
            assert from_hidden.item() == pytest.approx(expected, abs=2e-6)
            if eps == 0.9:
                from_logits.backward()
                from_hidden.backward()
                for got in (z.grad, h.grad):
                    torch.testing.assert_close(got.double(), want_grad, rtol=0, atol=1e-6)


# ---- properties ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", ["logits", "hidden"])
def test_weight_is_one_at_the_reference(source, backend):
    """theta = ref: the reference's token log-probs, from a separate no-grad call as a frozen reference's are, equal
    the policy's bit for bit, so every ratio is exactly 1 and the loss is -mean(A+ * S)."""
    hidden, weight, _, targets, mask = make_case(3, 17, 72, 1000, bias=False, masked_row=False)
    adv = torch.tensor([0.5, -1.0, 2.0])
    h, w = leaf(hidden), leaf(weight)
    logits = leaf(logits_of(hidden, weight, None))
    token_fn, inputs = ((kernels.token_logprobs, (logits,)) if source == "logits" else
                        (kernels.linear_token_logprobs, (h, w)))
    with torch.no_grad():
        ref_logp = token_fn(*inputs, targets, mask, backend=backend)
    logp = token_fn(*inputs, targets, mask, backend=backend)
    loss, stats = a_lol(logp, ref_logp, mask, adv, clip_eps=0.2, return_stats=True)
    assert stats["ratio"] == 1.0 and stats["clip_frac"] == 0.0
    s = logp.detach().sum(1)  # S_b, the statistic alol_loss does not return
    assert loss.item() == pytest.approx(-(adv.clamp(min=0) * s).mean().item(), rel=1e-6)
    loss.backward()
    if source == "logits":
        logits64 = leaf(logits, torch.float64)
        ref_alol_loss(ref_token_logprobs(logits64, targets, mask).sum(1), torch.ones(3), adv).backward()
        assert_grad_close(logits.grad, logits64.grad, torch.float32)
    else:
        h64, w64 = leaf(hidden, torch.float64), leaf(weight, torch.float64)
        s64 = ref_token_logprobs(logits_of(h64, w64, None), targets, mask).sum(1)
        ref_alol_loss(s64, torch.ones(3), adv).backward()
        assert_grad_close(h.grad, h64.grad, torch.float32)
        assert_grad_close(w.grad, w64.grad, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", ["logits", "hidden"])
def test_masked_positions_are_never_read(source, backend):
    """Garbage (NaN, huge values, out-of-range targets) at masked positions changes nothing; their gradient is 0."""
    hidden, weight, bias, targets, mask = make_case(3, 17, 72, 1000)
    # Sref_b = -60, -1, -55 spread over each row's response tokens (spread(): the same loss as a sequence-level
    # reference; row 1 is fully masked, so its log-ratio is 0)
    ref_logp, adv = spread(torch.tensor([-60.0, -1.0, -55.0]), mask), torch.tensor([1.0, 1.0, 0.5])
    results = []
    for garbage in [False, True]:
        h, z, t = hidden.clone(), logits_of(hidden, weight, bias), targets.clone()
        if garbage:
            bad = torch.full((int((~mask).sum()), hidden.shape[-1]), torch.nan)
            bad[::2] = 1e30
            h[~mask], z[~mask] = bad, torch.nan
            t[~mask] = torch.randint(-200, 5000, (len(bad),))
        if source == "logits":
            params = [leaf(z)]
            logp = kernels.token_logprobs(params[0], t, mask, backend=backend)
        else:
            params = [leaf(h), leaf(weight), leaf(bias)]
            logp = kernels.linear_token_logprobs(params[0], params[1], t, mask, bias=params[2], backend=backend)
        loss = a_lol(logp, ref_logp, mask, adv, clip_eps=0.9)
        loss.backward()
        results.append((loss, [p.grad for p in params]))
    (loss0, grads0), (loss1, grads1) = results
    assert torch.isfinite(loss1) and torch.equal(loss0, loss1)
    for g0, g1 in zip(grads0, grads1):
        assert torch.equal(g0, g1)
    assert (grads1[0][~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunking_does_not_change_results(backend, monkeypatch):
    """Token chunks, vocabulary chunks and splits (some empty), block widths that do not divide V: same results."""
    hidden, weight, bias, targets, mask = make_case(2, 64, 128, 4099)
    b_idx, t_idx = mask.nonzero(as_tuple=True)
    y = targets[b_idx, t_idx]
    h64, w64, b64 = leaf(hidden[b_idx, t_idx], torch.float64), leaf(weight, torch.float64), leaf(bias, torch.float64)
    ref = ref_token_logprobs(logits_of(h64, w64, b64), y, torch.ones_like(y))
    grad_out = torch.randn(y.shape)
    (ref * grad_out).sum().backward()
    ref_logits = leaf(logits_of(hidden, weight, bias), torch.float64)
    ref_rows = ref_token_logprobs(ref_logits, targets, mask)[b_idx, t_idx]
    (ref_rows * grad_out).sum().backward()
    if backend == "torch":
        linear_settings = [dict(chunk_tokens=7, chunk_vocab=100), dict(chunk_tokens=1000, chunk_vocab=333)]
        logits_settings = [dict(chunk_rows=5), dict(chunk_rows=1)]
        ops = torch_ops
    else:
        linear_settings = [dict(splits=3, chunk_tokens=5), dict(splits=7, chunk_tokens=16)]
        logits_settings = [dict(), dict()]
        ops = triton_ops
    for setting, logits_setting, block in zip(linear_settings, logits_settings, [256, 2048]):
        if backend == "triton":
            monkeypatch.setattr(triton_ops, "LOGITS_BLOCK_V", block)
        h, w, b = leaf(h64, torch.float32), leaf(w64, torch.float32), leaf(b64, torch.float32)
        out = ops.linear_logprobs(h, w, b, y, **setting)
        (out * grad_out).sum().backward()
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=LOGP_ATOL)
        for got, want in [(h, h64), (w, w64), (b, b64)]:
            assert_grad_close(got.grad, want.grad, torch.float32)
        logits = leaf(ref_logits, torch.float32)
        out = ops.token_logprobs(logits, b_idx, t_idx, y, **logits_setting)
        (out * grad_out).sum().backward()
        torch.testing.assert_close(out.double(), ref_rows, rtol=0, atol=LOGP_ATOL)
        assert_grad_close(logits.grad, ref_logits.grad, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_linear_chunks_in_low_precision(dtype):
    """bf16/fp16 weights on the chunked path: every dW slice sums several token chunks in fp32 before its one cast
    to the weight's dtype; log-probs stay exact (bf16 GEMMs run at "medium" precision, fp16 ones at the caller's)."""
    hidden, weight, bias, targets, mask = make_case(2, 64, 128, 4099, dtype)
    b_idx, t_idx = mask.nonzero(as_tuple=True)
    y = targets[b_idx, t_idx]
    h, w, b = leaf(hidden[b_idx, t_idx]), leaf(weight), leaf(bias)
    h64, w64, b64 = leaf(h, torch.float64), leaf(w, torch.float64), leaf(b, torch.float64)
    ref = ref_token_logprobs(logits_of(h64, w64, b64), y, torch.ones_like(y))
    out = torch_ops.linear_logprobs(h, w, b, y, chunk_tokens=7, chunk_vocab=333)
    grad_out = torch.randn(y.shape)
    (out * grad_out).sum().backward()
    (ref * grad_out).sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=LOGP_ATOL)
    for got, want in [(h, h64), (w, w64), (b, b64)]:
        assert got.grad.dtype == dtype
        assert_grad_close(got.grad, want.grad, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", ["logits", "hidden"])
@pytest.mark.parametrize("eps", [0.2, None])
def test_nonpositive_advantage_gives_zero_loss_and_gradient(eps, source, backend):
    """A = 0 and A < 0 with log-ratios of +-1e4: the weights stay finite, so 0 * w is 0, never inf * 0 = NaN."""
    hidden, weight, bias, targets, mask = make_case(3, 17, 72, 1000, masked_row=False)
    ref_logp = spread(torch.tensor([1e4, -1e4, 0.0]), mask)  # Sref_b = 1e4, -1e4, 0 (spread(): same loss)
    adv = torch.tensor([0.0, -3.0, 0.0])
    params = [leaf(logits_of(hidden, weight, bias))] if source == "logits" else [leaf(hidden), leaf(weight), leaf(bias)]
    logp = (kernels.token_logprobs(params[0], targets, mask, backend=backend) if source == "logits" else
            kernels.linear_token_logprobs(params[0], params[1], targets, mask, bias=params[2], backend=backend))
    loss = a_lol(logp, ref_logp, mask, adv, clip_eps=eps)
    loss.backward()
    assert loss.item() == 0.0
    for p in params:
        assert torch.equal(p.grad, torch.zeros_like(p))


def test_clip_modes():
    """alol_loss's clip modes: eps < 1: both bounds; eps >= 1: upper bound only; None: +-20 guard only; eps <= 0:
    error. A loss test, kept here because tests/test_alol.py does not cover all of it: its vectors check eps = 0.2,
    0.9 and None inside the guard, test_loss_ratio_guards eps = 0 and clip_frac = 1; not the missing lower bound at
    eps >= 1, the weights exactly at +-20, or the clip fraction of a mixed batch."""
    # S_b = -10, -20, -30 over two tokens; row 2's second token is outside the mask and holds garbage
    logp = torch.tensor([[-4.0, -6.0], [-15.0, -5.0], [-30.0, 123.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 1], [1, 0]])
    seq_logp = (logp.detach() * mask).sum(1)
    adv = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    for eps, log_ratio, weight, clip_frac in [
        (0.2, [-1.0, 0.1, 1.0], [0.8, math.exp(0.1), 1.2], 2 / 3),
        (1.5, [-3.0, 0.5, 2.0], [math.exp(-3.0), math.exp(0.5), 2.5], 1 / 3),
        (None, [-30.0, 0.3, 30.0], [math.exp(-20.0), math.exp(0.3), math.exp(20.0)], 2 / 3),
    ]:
        logp.grad = None
        # Sref_b = S_b - log_ratio_b, as token log-probs: the log-ratio spread over the row's response tokens
        lr = torch.tensor(log_ratio, dtype=torch.float64)
        ref_logp = torch.where(mask != 0, logp.detach(), torch.nan) - spread(lr, mask)
        loss, stats = a_lol(logp, ref_logp, mask, adv, clip_eps=eps, return_stats=True)
        loss.backward()
        w = torch.tensor(weight, dtype=torch.float64)
        assert loss.item() == pytest.approx(-(w * adv * seq_logp).mean().item(), rel=1e-6)
        torch.testing.assert_close(logp.grad, (-w * adv / 3)[:, None] * mask, rtol=1e-6, atol=0)
        assert stats["clip_frac"] == pytest.approx(clip_frac)
        assert stats["ratio"] == pytest.approx(w.mean().item(), rel=1e-6)
    for eps in [0.0, -0.1]:
        with pytest.raises(ValueError):
            a_lol(logp, ref_logp, mask, adv, clip_eps=eps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", ["logits", "hidden"])
def test_extreme_logits(source, backend):
    """hidden x 100 gives logits of |z| ~ 1000: no inf/NaN, and fp32-accurate against fp64. p = exp(z - lse) then
    carries the fp32 rounding of z - lse, one ulp of |z|: the gradients' tolerance is eps_fp32 * max|z|."""
    hidden, weight, bias, targets, mask = make_case(2, 64, 128, 4099)
    hidden = 100 * hidden
    params = [leaf(logits_of(hidden, weight, bias))] if source == "logits" else [leaf(hidden), leaf(weight), leaf(bias)]
    ref_params = [leaf(p, torch.float64) for p in params]
    if source == "logits":
        out = kernels.token_logprobs(params[0], targets, mask, backend=backend)
        ref = ref_token_logprobs(ref_params[0], targets, mask)
    else:
        out = kernels.linear_token_logprobs(*params[:2], targets, mask, bias=params[2], backend=backend)
        ref = ref_token_logprobs(logits_of(*ref_params), targets, mask)
    max_logit = logits_of(hidden, weight, bias).abs().max().item()
    assert max_logit > 500
    grad_out = torch.randn(mask.shape)
    (out * grad_out).sum().backward()
    (ref * grad_out).sum().backward()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=LOGP_ATOL)
    for got, want in zip(params, ref_params):
        assert_grad_close(got.grad, want.grad, torch.float32, rtol=torch.finfo(torch.float32).eps * max_logit)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", ["logits", "hidden"])
def test_fully_masked_batch(source, backend):
    hidden, weight, bias, targets, _ = make_case(3, 17, 72, 1000)
    mask = torch.zeros(3, 17, dtype=torch.int64)
    params = [leaf(logits_of(hidden, weight, bias))] if source == "logits" else [leaf(hidden), leaf(weight), leaf(bias)]
    logp = (kernels.token_logprobs(params[0], targets, mask, backend=backend) if source == "logits" else
            kernels.linear_token_logprobs(params[0], params[1], targets, mask, bias=params[2], backend=backend))
    assert torch.equal(logp, torch.zeros(3, 17))
    loss = a_lol(logp, torch.zeros(3, 17), mask, torch.ones(3))  # clip_eps 0.9, alol_loss's default
    loss.backward()
    assert loss.item() == 0.0
    for p in params:
        assert torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_and_tied_weight(backend):
    """Shifted slices (hidden[:, :-1], logits[:, :-1]), a transposed layout, and a head tied to the embedding."""
    _, weight, _, ids, _ = make_case(3, 18, 72, 1000)
    mask = torch.rand(3, 17, generator=torch.Generator().manual_seed(1)) < 0.7
    w, w64 = leaf(weight), leaf(weight, torch.float64)
    hidden = (3 * w[ids]).transpose(0, 1).contiguous().transpose(0, 1)  # [B, T+1, H] in a [T+1, B, H] layout
    assert not hidden[:, :-1].is_contiguous()
    out = kernels.linear_token_logprobs(hidden[:, :-1], w, ids[:, 1:], mask, backend=backend)
    ref = ref_token_logprobs((3 * w64[ids][:, :-1]) @ w64.T, ids[:, 1:], mask)
    grad_out = torch.randn(mask.shape)
    (out * grad_out).sum().backward()
    (ref * grad_out).sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=LOGP_ATOL)
    assert_grad_close(w.grad, w64.grad, torch.float32)  # embedding and head contributions, accumulated
    full = leaf(logits_of(w[ids].detach(), weight, None))
    full64 = leaf(full, torch.float64)
    out = kernels.token_logprobs(full[:, :-1], ids[:, 1:], mask, backend=backend)
    ref = ref_token_logprobs(full64[:, :-1], ids[:, 1:], mask)
    (out * grad_out).sum().backward()
    (ref * grad_out).sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=LOGP_ATOL)
    assert_grad_close(full.grad, full64.grad, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_are_bitwise_reproducible(backend):
    """The same inputs give the same bits: --resume and reruns depend on it (many tokens share few targets here,
    the case where accumulating atomics or CPU index_put_(accumulate=True) reorder the sums)."""
    hidden, weight, bias, targets, mask = make_case(8, 256, 64, 300, seed=3)
    grads = []
    for _ in range(4):
        h, w, b = leaf(hidden), leaf(weight), leaf(bias)
        logp = kernels.linear_token_logprobs(h, w, targets % 7, mask, bias=b, backend=backend)
        (logp * torch.linspace(0.5, 2.0, logp.shape[1])).sum().backward()
        grads.append(torch.cat([h.grad.flatten(), w.grad.flatten(), b.grad.flatten()]))
    assert all(torch.equal(grads[0], g) for g in grads[1:])


def test_autocast_runs_the_head_in_the_autocast_dtype():
    """Under CPU autocast (bf16) the head's operands are bf16, tiles and log-probs stay fp32, grads reach the
    fp32 parameters in fp32."""
    hidden, weight, _, targets, mask = make_case(3, 17, 72, 1000, bias=False)
    h, w = leaf(hidden), leaf(weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernels.linear_token_logprobs(h, w, targets, mask, backend="torch")
    h64, w64 = leaf(hidden.bfloat16(), torch.float64), leaf(weight.bfloat16(), torch.float64)
    ref = ref_token_logprobs(logits_of(h64, w64, None), targets, mask)
    out.sum().backward()
    ref.sum().backward()
    assert out.dtype == torch.float32 and w.grad.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=LOGP_ATOL)
    assert_grad_close(w.grad, w64.grad, torch.bfloat16)


@pytest.mark.parametrize("caller_precision", ["highest", "high"])
def test_bf16_path_restores_the_callers_matmul_precision(caller_precision):
    """bf16 inputs lower float32_matmul_precision to "medium" only while their GEMMs run (torch_ops._gemm_precision):
    the caller's setting is back after the forward and after the backward."""
    hidden, weight, _, targets, mask = make_case(3, 17, 72, 1000, bias=False)
    h, w = leaf(hidden.bfloat16()), leaf(weight.bfloat16())
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(caller_precision)
        out = kernels.linear_token_logprobs(h, w, targets, mask, backend="torch")
        assert torch.get_float32_matmul_precision() == caller_precision
        out.sum().backward()
        assert torch.get_float32_matmul_precision() == caller_precision
    finally:
        torch.set_float32_matmul_precision(saved)
    assert w.grad.dtype == torch.bfloat16


def test_out_of_range_target_is_an_error():
    hidden, weight, _, targets, mask = make_case(2, 5, 8, 50, bias=False, masked_row=False)
    targets[0, mask[0].nonzero()[0, 0]] = 50
    with pytest.raises(IndexError):
        kernels.linear_token_logprobs(hidden, weight, targets, mask, backend="torch")


# ---- gradcheck (fp64, PyTorch path) ----------------------------------------------------------------------------
def test_gradcheck_torch_path():
    hidden, weight, bias, targets, mask = make_case(2, 3, 4, 7, torch.float64, masked_row=False)
    mask[0, 1] = False
    logits = leaf(logits_of(hidden, weight, bias))
    h, w, b = leaf(hidden), leaf(weight), leaf(bias)
    assert torch.autograd.gradcheck(lambda z: kernels.token_logprobs(z, targets, mask, backend="torch"), (logits,))
    assert torch.autograd.gradcheck(
        lambda *p: torch_ops.linear_logprobs(p[0][mask], p[1], p[2], targets[mask], chunk_tokens=2, chunk_vocab=3),
        (h, w, b))
    assert torch.autograd.gradcheck(
        lambda *p: kernels.linear_token_logprobs(*p[:2], targets, mask, bias=p[2], backend="torch"), (h, w, b))
    # The weight is detached, so the loss's gradient is its true gradient only where the weight is locally
    # constant: log-ratios clipped at both ends (eps = 0.2) or beyond the +-20 guard (eps = None).
    # The reference's token log-probs are the policy's minus each row's offset spread over its response tokens
    # (spread(): the same loss as the sequence-level Sref_b = S_b - offset_b).
    token_logp = ref_token_logprobs(logits, targets, mask).detach()
    adv = torch.tensor([0.5, 1.5], dtype=torch.float64)
    for eps, offsets in [(0.2, [-1.0, 1.0]), (None, [-25.0, 25.0])]:
        ref_logp = token_logp - spread(torch.tensor(offsets, dtype=torch.float64), mask)
        assert torch.autograd.gradcheck(lambda z: a_lol(
            kernels.token_logprobs(z, targets, mask, backend="torch"), ref_logp, mask, adv, clip_eps=eps), (logits,))
        assert torch.autograd.gradcheck(lambda *p: a_lol(
            kernels.linear_token_logprobs(*p[:2], targets, mask, bias=p[2], backend="torch"), ref_logp, mask, adv,
            clip_eps=eps), (h, w, b))


# ---- backend selection -----------------------------------------------------------------------------------------
def test_backend_selection(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.delenv("ALOL_KERNEL_BACKEND", raising=False)
    assert kernels._ops(None, x) is (triton_ops if triton_ops and triton_ops.INTERPRET else torch_ops)
    assert kernels._ops("torch", x) is torch_ops
    monkeypatch.setenv("ALOL_KERNEL_BACKEND", "torch")
    assert kernels._ops(None, x) is torch_ops
    monkeypatch.setenv("ALOL_KERNEL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels._ops(None, x)
    if triton_ops is not None:
        monkeypatch.setattr(triton_ops, "INTERPRET", False)  # CPU tensors, no interpreter: Triton cannot run
        assert kernels._ops("auto", x) is torch_ops
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            kernels._ops("triton", x)


def test_imports_without_triton():
    code = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch, kernels
assert kernels.triton_ops is None
args = torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2)
assert torch.allclose(kernels.token_logprobs(*args), torch.full((1, 2), -torch.log(torch.tensor(3.0))))
try:
    kernels.token_logprobs(*args, backend="triton")
except RuntimeError as e:
    assert "not installed" in str(e)
else:
    raise SystemExit("backend='triton' without triton did not raise")
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).parents[1])


# ---- benchmark ---------------------------------------------------------------------------------------------------
def test_bench_skips_bf16_on_cpus_without_bf16_units(monkeypatch):
    from kernels import bench

    flags = pathlib.Path("/proc/cpuinfo").read_text().split() if pathlib.Path("/proc/cpuinfo").exists() else None
    if flags is not None:  # torch's CPU probe agrees with the kernel's flags
        assert bench.cpu_has_bf16_units() == bool({"avx512_bf16", "amx_bf16"} & set(flags))
    monkeypatch.setattr(bench, "cpu_has_bf16_units", lambda: False)
    names, why = bench.default_dtypes("cpu")
    assert names == ["fp32"] and why.startswith("bf16 skipped") and "\n" not in why
    monkeypatch.setattr(bench, "cpu_has_bf16_units", lambda: True)
    assert bench.default_dtypes("cpu") == (["fp32", "bf16"], "")
    assert bench.default_dtypes("cuda") == (["bf16"], "")


# ---- CUDA ------------------------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(16, 128, 1024, 50257)])
def test_cuda_triton_matches_fp64(shape, dtype):
    hidden, weight, bias, targets, mask = make_case(*shape, dtype)
    h, w, b = (leaf(x.cuda()) for x in (hidden, weight, bias))
    out = kernels.linear_token_logprobs(h, w, targets.cuda(), mask.cuda(), bias=b, backend="triton")
    h64, w64, b64 = leaf(hidden, torch.float64), leaf(weight, torch.float64), leaf(bias, torch.float64)
    ref = ref_token_logprobs(logits_of(h64, w64, b64), targets, mask)
    grad_out = torch.randn(mask.shape)
    (out * grad_out.cuda()).sum().backward()
    (ref * grad_out).sum().backward()
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-6, atol=LOGP_ATOL)
    for got, want in [(h, h64), (w, w64), (b, b64)]:
        assert_grad_close(got.grad.cpu(), want.grad, dtype)
    logits = leaf(logits_of(hidden, weight, bias).cuda())
    logits64 = leaf(logits.cpu(), torch.float64)
    out = kernels.token_logprobs(logits, targets.cuda(), mask.cuda(), backend="triton")
    ref = ref_token_logprobs(logits64, targets, mask)
    (out * grad_out.cuda()).sum().backward()
    (ref * grad_out).sum().backward()
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-6, atol=LOGP_ATOL)
    assert_grad_close(logits.grad.cpu(), logits64.grad, dtype)
