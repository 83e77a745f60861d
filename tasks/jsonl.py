"""Your own data: --train-file, --val-file and --test-file, JSONL rows {prompt, response, reward | rewards}, read
strictly (checks.read_jsonl); evaluated with the task's reward function, or --reward-fn."""
import importlib
import os
import sys

from checks import read_jsonl
from cli import AlolError


def load(args) -> dict:
    return {s: read_jsonl(getattr(args, f"{s}_file"), f"--{s}-file") for s in ("train", "val", "test")}


def reward_function(spec: str):
    """--reward-fn `module:function`, imported from the working directory or the Python path."""
    module, _, name = spec.partition(":")
    if os.getcwd() not in sys.path:  # `python path/to/alol.py` puts alol's folder first, not the working directory
        sys.path.insert(1, os.getcwd())
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise AlolError(f"--reward-fn {spec!r}: cannot import ({e}); expected `module:function`") from None
