"""Test-session setup. Runs before any test module imports `kernels` or `alol`."""
import os

import torch

# Triton reads TRITON_INTERPRET when `@triton.jit` decorates a kernel, so it must be set before `kernels` is
# imported. On a machine without CUDA the interpreter is the only way to run the Triton kernels at all.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# No test may reach the Hugging Face hub: hub code paths are tested with tiny models saved to a temp dir.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_policy(path, args):
    """A saved policy as alol.main loads one: dropout off, so log-prob passes are deterministic."""
    import alol
    import models

    return alol.disable_dropout(models.load_policy(path, args))


def run_cli(argv):
    """`python alol.py ARGV` in this process: the exit code; errors go to stderr as one line."""
    import alol
    import cli

    return cli.run(alol.main, alol.parse_args, argv)
