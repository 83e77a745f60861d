"""Benchmark of the A-LoL sequence loss computed from the LM head's input: python -m kernels.bench

    python -m kernels.bench                 # B=16, T=128, H=1024, V=50257 (DialoGPT-medium), 70 % response tokens
    python -m kernels.bench --small -r 3    # a quick look
    python -m kernels.bench --dtype bf16    # one input dtype (default: bf16 on CUDA; fp32 and bf16 on CPU, bf16
                                            # only where the CPU has bf16 units)

Providers differ only in how they get the token log-probs [B, T]; every one then computes the same loss with the one
copy of it, alol.py's alol_loss(logp, ref_logp, mask, reward, value, algo="a_lol", clip_eps=0.2) (so run this from
the repository root, where alol.py is). Each gets hidden [B, T, H] and the head weight [V, H] with requires_grad:
  naive         the official code's way: logits = h @ W.T for every position, fp32 log_softmax, gather (then
                alol_loss's masked sum)
  torch         kernels.linear_token_logprobs(..., backend="torch"): compaction + chunked online log-sum-exp
  triton-logits (CUDA) logits by cuBLAS, then kernels.token_logprobs(..., backend="triton")
  triton-linear (CUDA) kernels.linear_token_logprobs(..., backend="triton"), the fused linear Triton kernels
  liger, cce    (CUDA, if installed) Liger-Kernel's fused linear cross-entropy / Apple's Cut Cross-Entropy,
                per-token with reduction="none", masked positions as ignore_index

Times: medians over --repeats runs after a warm-up, the providers interleaved run by run (on a shared machine a
change of load then hits all of them alike). Peak extra memory: over one forward+backward after a warm-up; on
CUDA max_memory_allocated above what was allocated before; on CPU in a fresh subprocess per provider, the peak
resident set size (VmHWM, reset through /proc/self/clear_refs) above the resident size before the run, with
MALLOC_MMAP_THRESHOLD_ set so that freed buffers go back to the OS and RSS follows live memory. That peak includes
the gradients every provider must return (dW: V*H, dH: B*T*H elements; 214 MB in fp32 and 107 MB in bf16 at the
default shape), so "work MB" also shows it without them: the memory a provider needs beyond its inputs and outputs.
In fp32 the returned dW alone is 0.175 x the naive peak, so no provider's total can go below that ratio there. TFLOP/s count
6*N_r*H*V for forward+backward (N_r response tokens), whatever a provider really computes, against the 798 TFLOP/s
measured for a bf16 GEMM on an H100.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time

import torch

import alol  # the loss (alol_loss); python -m kernels.bench runs from the repository root, where alol.py is
import kernels

H100_TFLOPS = 798.0


def a_lol(logp, mask, ref_logp, reward, value, eps):
    """The loss every provider times after its log-probs: alol.py's alol_loss, algo "a_lol"."""
    return alol.alol_loss(logp, ref_logp, mask, reward, value, algo="a_lol", clip_eps=eps)


def naive_loss(hidden, weight, targets, mask, ref_logp, reward, value, eps):
    logits = hidden @ weight.T  # [B, T, V] for every position, prompt and padding included
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    return a_lol(logp, mask, ref_logp, reward, value, eps)  # alol_loss zeroes the positions outside the mask


def kernel_loss(backend):
    def loss(hidden, weight, targets, mask, ref_logp, reward, value, eps):
        logp = kernels.linear_token_logprobs(hidden, weight, targets, mask, backend=backend)
        return a_lol(logp, mask, ref_logp, reward, value, eps)
    return loss


def triton_logits_loss(hidden, weight, targets, mask, ref_logp, reward, value, eps):
    logp = kernels.token_logprobs(hidden @ weight.T, targets, mask, backend="triton")
    return a_lol(logp, mask, ref_logp, reward, value, eps)


def liger_loss(hidden, weight, targets, mask, ref_logp, reward, value, eps):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    nll = LigerFusedLinearCrossEntropyLoss(reduction="none")(weight, hidden.flatten(0, 1),
                                                             targets.masked_fill(mask == 0, -100).flatten())
    return a_lol(-nll.float().view(mask.shape), mask, ref_logp, reward, value, eps)


def cce_loss(hidden, weight, targets, mask, ref_logp, reward, value, eps):
    from cut_cross_entropy import linear_cross_entropy

    nll = linear_cross_entropy(hidden, weight, targets.masked_fill(mask == 0, -100), reduction="none")
    return a_lol(-nll.float(), mask, ref_logp, reward, value, eps)


def providers(device):
    found = {"naive": naive_loss, "torch": kernel_loss("torch")}
    if device == "cuda":
        found.update({"triton-logits": triton_logits_loss, "triton-linear": kernel_loss("triton")})
        for name, module, fn in [("liger", "liger_kernel", liger_loss), ("cce", "cut_cross_entropy", cce_loss)]:
            try:
                __import__(module)
                found[name] = fn
            except ImportError:
                pass
    return found


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(a, device, dtype):
    torch.manual_seed(0)
    hidden = torch.randn(a.B, a.T, a.H, device=device).to(dtype).requires_grad_()
    weight = (0.02 * torch.randn(a.V, a.H, device=device)).to(dtype).requires_grad_()
    targets = torch.randint(0, a.V, (a.B, a.T), device=device)
    mask = torch.zeros(a.B, a.T, device=device)
    mask[:, a.T - round(a.frac * a.T):] = 1  # prompt first, then the response
    with torch.no_grad():
        logp = kernels.linear_token_logprobs(hidden, weight, targets, mask, backend="torch")
    # The reference's token log-probs: the policy's, with a log-ratio offset per sequence of std 0.1 spread evenly
    # over its response tokens, so sequence ratios are near 1 and some are clipped at eps = 0.2
    offset = 0.1 * torch.randn(a.B, device=device)
    ref_logp = (logp + offset[:, None] / mask.sum(dim=1, keepdim=True).clamp(min=1)) * mask
    reward, value = torch.randn(a.B, device=device), torch.zeros(a.B, device=device)  # advantage = reward - value
    return (hidden, weight, targets, mask, ref_logp, reward, value, 0.2)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def fwd_bwd(fn, inputs, device):
    """One forward and one backward; returns (loss, forward s, backward s)."""
    for x in inputs[:2]:
        x.grad = None
    sync(device)
    t0 = time.perf_counter()
    loss = fn(*inputs)
    sync(device)
    t1 = time.perf_counter()
    loss.backward()
    sync(device)
    return loss.item(), t1 - t0, time.perf_counter() - t1


def _proc_mb(key):
    return int(re.search(rf"{key}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024


def time_all(names, a, device, dtype):
    """Median forward, backward and forward+backward seconds per provider, providers interleaved run by run so that
    a change in machine load (a shared CPU) hits all of them alike."""
    found, inputs = providers(device), make_inputs(a, device, dtype)
    for name in names:
        fwd_bwd(found[name], inputs, device)  # warm-up: library initialisation, autotuning
    runs = {name: [] for name in names}
    for _ in range(a.repeats):
        for name in names:
            runs[name].append(fwd_bwd(found[name], inputs, device))
    return {name: {"loss": r[-1][0], "fwd": statistics.median(x[1] for x in r),
                   "bwd": statistics.median(x[2] for x in r), "total": statistics.median(x[1] + x[2] for x in r)}
            for name, r in runs.items()}


def peak_memory(name, a, device, dtype):
    """Peak memory (MiB) of one forward+backward above what was allocated before it, after a warm-up run."""
    fn, inputs = providers(device)[name], make_inputs(a, device, dtype)
    fwd_bwd(fn, inputs, device)
    for x in inputs[:2]:
        x.grad = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd(fn, inputs, device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _proc_mb("VmRSS")
    fwd_bwd(fn, inputs, device)
    return _proc_mb("VmHWM") - base


def peak_memory_in_subprocess(name, a, dtype_name):
    """peak_memory() on CPU in a fresh interpreter, so that no provider inherits another one's heap."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, "-m", "kernels.bench", "--worker", name, f"--dtype={dtype_name}", *a.shape_args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def report(a, device, dtype_name):
    """Time and measure every provider on inputs of one dtype; print the table."""
    dtype = DTYPES[dtype_name]
    n_resp = a.B * round(a.frac * a.T)
    flops = 6 * n_resp * a.H * a.V
    print(f"A-LoL sequence loss from hidden states on {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}"
          f" ({torch.get_num_threads()} threads): B={a.B} T={a.T} H={a.H} V={a.V}, {n_resp} response tokens, "
          f"{dtype_name} inputs, median of {a.repeats}")
    names = list(providers(device))
    rows = time_all(names, a, device, dtype)
    for name in names:
        rows[name]["peak_mb"] = (peak_memory(name, a, device, dtype) if device == "cuda"
                                 else peak_memory_in_subprocess(name, a, dtype_name))
    grad_mb = (a.V + a.B * a.T) * a.H * dtype.itemsize / 2**20
    base = rows["naive"]
    header = f"{'provider':<14}{'loss':>12}{'fwd ms':>9}{'bwd ms':>9}{'f+b ms':>9}{'x naive':>8}" \
             f"{'peak MB':>9}{'x naive':>8}{'work MB':>9}{'x naive':>8}"
    print(header + (f"{'TFLOP/s':>9}{'% 798':>7}" if device == "cuda" else ""))
    for name, r in rows.items():
        work, base_work = r["peak_mb"] - grad_mb, base["peak_mb"] - grad_mb
        line = f"{name:<14}{r['loss']:>12.6f}{1e3 * r['fwd']:>9.1f}{1e3 * r['bwd']:>9.1f}{1e3 * r['total']:>9.1f}" \
               f"{r['total'] / base['total']:>8.2f}{r['peak_mb']:>9.1f}{r['peak_mb'] / base['peak_mb']:>8.3f}" \
               f"{work:>9.1f}{work / base_work:>8.3f}"
        if device == "cuda":
            tflops = flops / r["total"] / 1e12
            line += f"{tflops:>9.1f}{100 * tflops / H100_TFLOPS:>7.1f}"
        print(line)


def cpu_has_bf16_units():
    """AVX512-BF16 or AMX (x86): oneDNN runs bf16 GEMMs in hardware. Without them it emulates them: the naive bf16
    run alone took over 4 minutes at the default shape on an AMD EPYC without AVX-512."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def default_dtypes(device):
    """The input dtypes to benchmark when --dtype is not given, and why one was left out (or "")."""
    if device == "cuda":
        return ["bf16"], ""
    if cpu_has_bf16_units():
        return ["fp32", "bf16"], ""
    return ["fp32"], ("bf16 skipped: this CPU has no bf16 units (AVX512-BF16 or AMX), so its bf16 GEMMs are "
                      "emulated and take minutes; --dtype bf16 runs it anyway")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=16, help="sequences")
    p.add_argument("--T", type=int, default=128, help="tokens per sequence")
    p.add_argument("--H", type=int, default=1024, help="hidden size (DialoGPT-medium: 1024)")
    p.add_argument("--V", type=int, default=50257, help="vocabulary size (GPT-2: 50257)")
    p.add_argument("--frac", type=float, default=0.7, help="fraction of response tokens per sequence")
    p.add_argument("--dtype", choices=list(DTYPES), action="append",
                   help="input dtype of hidden and weight, repeatable (default: bf16 on CUDA; fp32 and, on a CPU with "
                        "bf16 units, bf16 on CPU)")
    p.add_argument("-r", "--repeats", type=int, default=5, help="timed runs per provider (the median is shown)")
    p.add_argument("--small", action="store_true", help="B=4, T=64, H=256, V=8192")
    p.add_argument("--worker", metavar="PROVIDER", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.small:
        a.B, a.T, a.H, a.V = 4, 64, 256, 8192
    a.shape_args = [f"--B={a.B}", f"--T={a.T}", f"--H={a.H}", f"--V={a.V}", f"--frac={a.frac}",
                    f"--repeats={a.repeats}"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype_names, skipped = (a.dtype, "") if a.dtype else default_dtypes(device)
    if a.worker:
        print(peak_memory(a.worker, a, device, DTYPES[dtype_names[0]]))
        return
    for i, dtype_name in enumerate(dtype_names):
        if i:
            print()
        report(a, device, dtype_name)
    if skipped:
        print(skipped)


if __name__ == "__main__":
    main()
