"""Compile every Triton kernel for real GPUs on a machine without one: python -m kernels.compile_check

    python -m kernels.compile_check                  # table: shared memory, registers, spills per config
    python -m kernels.compile_check --arch 86 89     # other architectures (default: 75 80 90)
    python -m kernels.compile_check --json           # one JSON record per compile (what tests/test_compile.py reads)

The triton wheel ships NVIDIA's `ptxas`, so Triton's real compiler runs without a GPU: triton.compile(ASTSource(...),
target=GPUTarget("cuda", capability, 32)) lowers a kernel to a cubin and reports the shared memory a block needs;
ptxas's log gives registers per thread and spills. The interpreter (TRITON_INTERPRET=1) checks none of this, and
an autotuned kernel whose every config needs more shared memory than the GPU allows cannot launch there.

Each kernel of kernels/triton_ops.py is compiled with the argument types its launcher passes, for fp32, fp16 and bf16
operands, for every config its autotuner may try on the architecture (see jobs() for the constexpr variants), as it
would be specialised for DialoGPT-medium (H = 1024, V = 50257): pointers 16-byte aligned, integers divisible by 16
marked so, integers equal to 1 turned into constants (what Triton's launcher does). Must run without TRITON_INTERPRET
(the interpreter replaces `@triton.jit` functions); compiles run in parallel worker processes, about 2 minutes for
the default architectures on 2 CPU cores.
"""
import argparse
import concurrent.futures
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time

# Shared memory per block a kernel may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin), bytes, and the GPUs.
ARCHS = {
    75: (64 * 1024, "T4"),
    80: (163 * 1024, "A100"),
    86: (99 * 1024, "RTX 3090, A10"),
    89: (99 * 1024, "RTX 4090, L4"),
    90: (227 * 1024, "H100, H200"),
}
# sm_86 and sm_89 compile to exactly sm_80's shared memory for every kernel, config and dtype (measured with
# --arch 80 86 89), so the test compiles sm_80 once and checks it against all three limits.
SAME_AS = {86: 80, 89: 80}
ELEMENT_SIZE = {"fp32": 4, "fp16": 2, "bf16": 2}  # operand dtypes (Triton's names) and their bytes

# Argument types as the launchers in kernels/triton_ops.py pass them. "*op" is a pointer to operand-dtype data (the
# model's dtype); integers carry a value at DialoGPT-medium's shape (B = 16, T = 128, H = 1024, V = 50257, 1434
# response tokens, 4 vocabulary splits), of which Triton keeps only "divisible by 16" and "equal to 1".
H, V, T_LEN, N_TOK = 1024, 50257, 128, 1434
SIGNATURES = {
    "_logits_fwd_kernel": dict(z_ptr="*op", b_idx_ptr="*i64", t_idx_ptr="*i64", y_ptr="*i64", lse_ptr="*fp32",
                               logp_ptr="*fp32", V=V, stride_b=T_LEN * V, stride_t=V, stride_v=1),
    "_logits_bwd_kernel": dict(z_ptr="*op", dz_ptr="*op", b_idx_ptr="*i64", t_idx_ptr="*i64", y_ptr="*i64",
                               lse_ptr="*fp32", g_ptr="*fp32", V=V, stride_b=T_LEN * V, stride_t=V, stride_v=1,
                               dstride_b=T_LEN * V, dstride_t=V),
    "_linear_fwd_kernel": dict(h_ptr="*op", w_ptr="*op", b_ptr="*op", y_ptr="*i64", lse_part_ptr="*fp32",
                               zy_part_ptr="*fp32", N=N_TOK, V=V, H=H, stride_h=H, stride_w=H, SPLITS=4),
    "_linear_dz_kernel": dict(h_ptr="*op", w_ptr="*op", b_ptr="*op", y_ptr="*i64", lse_ptr="*fp32", g_ptr="*fp32",
                              dz_ptr="*op", N=N_TOK, V=V, H=H, stride_h=H, stride_w=H),
}
# @triton.jit functions that are only called from kernels: compiled as part of them.
HELPERS = {"_logits_tile"}


def _triton_ops():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("kernels.compile_check compiles for GPUs: run it without TRITON_INTERPRET=1")
    from kernels import triton_ops
    return triton_ops


def kernel_objects():
    """Every @triton.jit / @triton.autotune object defined in kernels/triton_ops.py, by name."""
    import triton
    ops = _triton_ops()
    return {name: obj for name, obj in vars(ops).items()
            if isinstance(obj, (triton.runtime.JITFunction, triton.runtime.Autotuner))}


def constexpr_variants(name, dtype):
    """The constexpr values a launch can pass besides the config's, for operands of `dtype`; the first is compiled
    with every config, the others with the first config only (see jobs())."""
    if name.startswith("_logits_"):
        ops = _triton_ops()
        return [dict(BLOCK_V=ops.LOGITS_BLOCK_V)]  # the launchers' block (narrower only when V is smaller)
    # fp32 operands use "ieee" under float32_matmul_precision "highest" (PyTorch's default), else "tf32": two code
    # paths (FMA vs tensor cores), both compiled with every config. fp16/bf16 always get "tf32", which tl.dot ignores
    # for them. HAS_BIAS=True (a head with a bias; GPT-2's is tied, without) adds one [BLOCK_V] load after the loop.
    precisions = ["ieee", "tf32"] if dtype == "fp32" else ["tf32"]
    return [dict(HAS_BIAS=bias, UPCAST=False, PRECISION=p) for bias in (False, True) for p in precisions]


def launch_configs(name, obj):
    """(triton.Config or None, constexprs, num_warps, num_stages) of every config a launch may use."""
    ops = _triton_ops()
    if hasattr(obj, "configs"):
        return [(c, dict(c.kwargs), c.num_warps, c.num_stages) for c in obj.configs]
    return [(None, {}, ops.LOGITS_NUM_WARPS, None)]  # one launch config; Triton's default number of stages


def stands_for(arch, compiled):
    """The architectures whose limits a compile for `arch` is checked against (SAME_AS)."""
    return [arch] + [a for a, b in SAME_AS.items() if b == arch and a not in compiled]


def tried_configs(obj, element_size, arch):
    """The configs the autotuner would benchmark on a GPU of this arch (its pruning, at the arch's shared memory
    limit); none when the pruning finds nothing that fits."""
    if not hasattr(obj, "configs"):
        return []
    try:
        return _triton_ops().fitting_configs(obj.configs, element_size, divmod(arch, 10), ARCHS[arch][0])
    except RuntimeError:
        return []


def jobs(archs, every_config=False):
    """Every (kernel, arch, dtype, variant, config) to compile, with what the autotuner's pruning decides for it.

    Each record says, per architecture it stands for, whether the autotuner would try the config there
    (triton_ops.fitting_configs with the arch's limit; non-autotuned kernels always run theirs), and the pruning's
    estimate of its shared memory. Configs the autotuner would try nowhere are compiled only with every_config.
    HAS_BIAS=True variants are compiled with the first config tried, on the first arch only (they add one vector
    load after the K loop; tests/test_compile.py checks they need the same shared memory as the bias-free compile).
    """
    ops = _triton_ops()
    objs = kernel_objects()
    missing = set(objs) - set(SIGNATURES) - HELPERS
    if missing:
        raise SystemExit(f"kernels.compile_check has no signature for {sorted(missing)}: add them to SIGNATURES")
    out = []
    for name in SIGNATURES:
        for arch in archs:
            checked = stands_for(arch, archs)
            for dtype in ELEMENT_SIZE:
                first_tried = {}  # precision -> index of the first config tried without bias
                for variant in constexpr_variants(name, dtype):
                    configs = launch_configs(name, objs[name])
                    tried_here = {a: tried_configs(objs[name], ELEMENT_SIZE[dtype], a) for a in checked}
                    for i, (config, meta, warps, stages) in enumerate(configs):
                        estimate = (None if config is None else
                                    ops.shared_memory_bytes(config, ELEMENT_SIZE[dtype], divmod(arch, 10)))
                        tried = {str(a): config is None or any(config is c for c in tried_here[a]) for a in checked}
                        if variant.get("HAS_BIAS"):
                            if arch != archs[0] or first_tried.get(variant["PRECISION"]) != i:
                                continue
                        elif every_config or any(tried.values()):
                            first_tried.setdefault(variant.get("PRECISION"), i)
                        else:
                            continue
                        out.append(dict(kernel=name, arch=arch, dtype=dtype, variant=variant, config=i, meta=meta,
                                        num_warps=warps, num_stages=stages, estimate=estimate, tried=tried))
    return out


def _ptxas_log(log):
    """Registers per thread and spill bytes from ptxas -v output."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(regs.group(1)) if regs else None,
            int(spills.group(1)) + int(spills.group(2)) if spills else None)


def compile_one(job):
    """Compile one job with Triton's real compiler; the job dict plus ok, shared, regs, spills (or error), seconds."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel_objects()[job["kernel"]]
    if isinstance(fn, triton.runtime.Autotuner):
        fn = fn.fn  # the JITFunction it tunes
    signature, constexprs, attrs = {}, dict(job["variant"], **job["meta"]), {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
            continue
        kind = SIGNATURES[job["kernel"]][arg]
        if isinstance(kind, str):
            signature[arg] = "*" + job["dtype"] if kind == "*op" else kind
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations and the launchers' slices are aligned
        elif kind == 1:
            signature[arg], constexprs[arg] = "constexpr", 1
        else:
            signature[arg] = "i32"
            if kind % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    log = io.StringIO()
    start = time.perf_counter()
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v's report is printed: capture it
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what launches get in triton 3.9, without its warning
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", job["arch"], 32),
                                      options={"num_warps": job["num_warps"]} | (
                                          {"num_stages": job["num_stages"]} if job["num_stages"] else {}))
    except Exception as e:  # a failed compile is a result to report, not a crash of the whole check
        return dict(job, ok=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}",
                    seconds=time.perf_counter() - start)
    regs, spills = _ptxas_log(log.getvalue())
    return dict(job, ok=True, shared=compiled.metadata.shared, regs=regs, spills=spills,
                seconds=time.perf_counter() - start)


def run(archs, workers=None, every_config=False):
    """Compile every job in worker processes (sharing a fresh Triton cache) and return the results."""
    todo = jobs(archs, every_config)
    workers = workers or min(len(todo), os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # a fresh cache: every figure comes from a real compile
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            return list(pool.map(compile_one, todo))


def fmt_config(r):
    meta = ",".join(str(v) for v in r["meta"].values()) or f"BLOCK_V={r['variant'].get('BLOCK_V')}"
    return f"({meta}) w{r['num_warps']}" + (f" s{r['num_stages']}" if r["num_stages"] else "")


def operands(r):
    """fp32 operands name their tl.dot path: ieee (FMA) or tf32 (tensor cores)."""
    fp32_path = r["dtype"] == "fp32" and "PRECISION" in r["variant"]
    return r["dtype"] + ("/" + r["variant"]["PRECISION"] if fp32_path else "")


def print_table(results):
    """Bias-free compiles, one row per kernel, config and operand type; per arch: shared KB, registers per thread,
    spilled bytes (stores + loads). sm_86/89 show sm_80's compile. '(pruned)': the autotuner does not try it there;
    'OVER': it would try it, and it does not fit."""
    rows = {}
    for r in results:
        if not r["variant"].get("HAS_BIAS"):
            rows.setdefault((r["kernel"], r["config"], operands(r)), {})[r["arch"]] = r
    archs = sorted({r["arch"] for r in results})
    shown = sorted(set(archs) | {a for arch in archs for a in stands_for(arch, archs)})
    head = f"{'kernel':<20}{'config (BN,BV,BK) warps stages':<26}{'operands':<11}"
    print(head + "".join(f"{f'sm_{a} (limit {ARCHS[a][0] // 1024} KB)':>24}" for a in shown))
    print(f"{'':<57}" + "".join(f"{'KB regs spill':>24}" for _ in shown))
    order = {name: i for i, name in enumerate(SIGNATURES)}
    for (kernel, config, ops_name), by_arch in sorted(rows.items(), key=lambda kv: (order[kv[0][0]], kv[0][1:])):
        cells = []
        for a in shown:
            r = by_arch.get(a if a in archs else SAME_AS.get(a))
            if r is None:
                cells.append("(pruned)")
            elif not r["ok"]:
                cells.append("FAILED")
            else:
                flag = "" if r["tried"][str(a)] else " (pruned)"
                if r["tried"][str(a)] and r["shared"] > ARCHS[a][0]:
                    flag = " OVER"
                cells.append(f"{r['shared'] / 1024:.0f} {r['regs']} {r['spills']}{flag}")
        some = next(iter(by_arch.values()))
        print(f"{kernel:<20}{fmt_config(some):<26}{ops_name:<11}" + "".join(f"{c:>24}" for c in cells))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[75, 80, 90], choices=sorted(ARCHS),
                   help="compute capabilities to compile for (default: 75 80 90; 86 and 89 are checked from 80)")
    p.add_argument("--workers", type=int, help="parallel compile processes (default: one per CPU)")
    p.add_argument("--every-config", action="store_true",
                   help="also compile the configs the autotuner prunes on every arch given (to see their figures)")
    p.add_argument("--json", action="store_true", help="print one JSON record per compile instead of the table")
    a = p.parse_args()
    start = time.perf_counter()
    results = run(a.arch, a.workers, a.every_config)
    if a.json:
        for r in results:
            print(json.dumps(r))
    else:
        print_table(results)
        failed = [r for r in results if not r["ok"]]
        for r in failed:
            print(f"FAILED {r['kernel']} sm_{r['arch']} {r['dtype']} {r['variant']} {fmt_config(r)}: {r['error']}")
        print(f"{len(results)} compiles in {time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
