"""The Triton kernels compile for real GPUs, and every config the autotuner may try fits the GPU's shared memory.

No GPU is needed: the triton wheel ships NVIDIA's ptxas, so `python -m kernels.compile_check` (run here in a
subprocess without TRITON_INTERPRET, which tests/conftest.py sets for the rest of the suite) lowers every kernel of
kernels/triton_ops.py to a cubin for sm_75 (T4), sm_80 (A100) and sm_90 (H100), for fp32, fp16 and bf16 operands.
sm_86 (RTX 3090, A10) and sm_89 (RTX 4090, L4) get exactly sm_80's shared memory (measured for every config with
`--arch 80 86 89`), so sm_80's compile is checked against their 99 KB too. 94 compiles, 1.5-2.3 minutes on 2 CPU cores.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed: nothing to compile")

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMPILED = [75, 80, 90]
CHECKED = {75: 75, 80: 80, 86: 80, 89: 80, 90: 90}  # limit's arch -> arch whose compile stands for it


@pytest.fixture(scope="module")
def compiled():
    """Every compile record of kernels.compile_check, and the autotuner's configs and pruning as a GPU would see them
    (kernels.triton_ops imported without the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--json", "--arch", *map(str, COMPILED)],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_every_kernel_and_dtype_is_compiled_for_every_arch(compiled):
    from kernels import compile_check

    kernels = set(compile_check.SIGNATURES)
    assert {"_logits_fwd_kernel", "_logits_bwd_kernel", "_linear_fwd_kernel", "_linear_dz_kernel"} <= kernels
    seen = {(r["kernel"], r["arch"], r["dtype"]) for r in compiled}
    assert seen == {(k, a, d) for k in kernels for a in COMPILED for d in ("fp32", "fp16", "bf16")}


def test_every_compile_succeeds(compiled):
    failed = [f"{r['kernel']} sm_{r['arch']} {r['dtype']} {r['variant']} config {r['config']}: {r['error']}"
              for r in compiled if not r["ok"]]
    assert not failed, "\n".join(failed)


def test_every_config_the_autotuner_may_try_fits(compiled):
    """Per (arch, dtype, kernel): the configs left by the autotuner's pruning need at most the arch's shared memory
    per block, measured by the compiler (sm_86/89: sm_80's compile), and at least one is left."""
    from kernels import compile_check

    problems = []
    for arch, source in CHECKED.items():
        limit = compile_check.ARCHS[arch][0]
        for (kernel, dtype), records in group(compiled, source).items():
            tried = {r["config"] for r in records if r["tried"][str(arch)]}
            if not tried:
                problems.append(f"{kernel} {dtype} sm_{arch}: no config left to try")
            for r in records:
                if r["config"] in tried and r["shared"] > limit:
                    problems.append(f"{kernel} {dtype} sm_{arch} {r['variant']} config {r['config']} "
                                    f"{r['meta']}: {r['shared']} B > {limit} B")
    assert not problems, "\n".join(problems)


def test_pruning_estimate_bounds_the_compiler(compiled):
    """The pruning decides from an estimate, so the estimate must never be below what the compiler allocates."""
    low = [f"{r['kernel']} sm_{r['arch']} {r['dtype']} config {r['config']}: estimate {r['estimate']} B < "
           f"compiled {r['shared']} B" for r in compiled
           if r["ok"] and r["estimate"] is not None and r["estimate"] < r["shared"]]
    assert not low, "\n".join(low)


def test_bias_variant_needs_what_the_bias_free_kernel_needs(compiled):
    """HAS_BIAS=True is compiled with one config per operand type (it adds one [BLOCK_V] load after the K loop); the
    other configs' figures stand for it only if it needs exactly the bias-free shared memory."""
    free = {(r["kernel"], r["arch"], r["dtype"], r["variant"].get("PRECISION"), r["config"]): r["shared"]
            for r in compiled if r["ok"] and not r["variant"].get("HAS_BIAS", False)}
    biased = [r for r in compiled if r["ok"] and r["variant"].get("HAS_BIAS")]
    assert {r["kernel"] for r in biased} == {"_linear_fwd_kernel", "_linear_dz_kernel"}
    for r in biased:
        key = (r["kernel"], r["arch"], r["dtype"], r["variant"]["PRECISION"], r["config"])
        assert r["shared"] == free[key], key


# The bf16/fp16 configs of the kernels before fp32 got its own: (BLOCK_N, BLOCK_V, BLOCK_K), warps, stages.
FAST_BF16 = {((128, 128, 64), 8, 3), ((64, 128, 64), 4, 4), ((128, 256, 64), 8, 3), ((64, 256, 64), 8, 3)}


def test_fast_bf16_configs_are_kept_where_they_fit(compiled):
    """Pruning must not cost bf16 its large tiles where the GPU holds them: on A100 and H100 all four are tried, on
    the 99 KB GPUs all four too (they need 64-96 KB there)."""
    for arch, source in [(80, 80), (86, 80), (89, 80), (90, 90)]:
        for (kernel, dtype), records in group(compiled, source).items():
            if dtype == "bf16" and kernel.startswith("_linear_"):
                tried = {(tuple(r["meta"].values()), r["num_warps"], r["num_stages"]) for r in records
                         if r["tried"][str(arch)]}
                assert tried == FAST_BF16, (kernel, arch)


def group(compiled, arch):
    """Records of one compiled arch by (kernel, dtype)."""
    out = {}
    for r in compiled:
        if r["arch"] == arch and r["ok"]:
            out.setdefault((r["kernel"], r["dtype"]), []).append(r)
    return out
