"""Caches with fingerprints and checksums: the frozen reference's quantities and the tasks' scored data, each
computed once, and the fingerprints of what a run reads (checked on --resume)."""
import hashlib
import inspect
import io
import json
import os
import types

import torch
import torch.nn as nn

import models
from checks import read_jsonl
from cli import AlolError
from distributed import world
from rundir import write_atomic
from scoring import add_rewards

# What the cached log-probs and V(x) depend on besides the reference's weights, the data and the reward code.
FROZEN_SETTINGS = ("seed", "value_target", "value_samples", "value_epochs", "value_lr", "max_prompt_len",
                   "max_response_len", "eval_max_new_tokens", "eval_num_beams", "eval_repetition_penalty", "eval_stop",
                   "eval_batch_size", "reward_fn", "task", "device", "bf16", "kernel", "fluency_model",
                   "safety_model", "depth_model", "updown_model")


def fingerprint(*parts) -> str:
    """sha256 over models (their weights) and dicts of tensors (their bytes) or JSON-able settings."""
    h = hashlib.sha256()
    for part in parts:
        for name, value in sorted((part.state_dict() if isinstance(part, nn.Module) else part).items()):
            h.update(name.encode())
            h.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if torch.is_tensor(value)
                     else json.dumps(value).encode())
    return h.hexdigest()[:20]


def code_fingerprint(fn) -> str:
    """sha256 of a function's source and, recursively, of the functions of its own module that it names and the
    data constants it reads (globals or closure cells): an edit to any of them changes it, an edit elsewhere in the
    file does not."""
    fn = fn if isinstance(fn, types.FunctionType) else getattr(type(fn), "__call__", fn)  # a callable object: its code
    if not isinstance(fn, types.FunctionType):  # a builtin or a partial: nothing to follow, so never reused
        return repr(fn)
    h, todo, seen = hashlib.sha256(), [fn], set()
    while todo:
        fn = todo.pop()
        seen.add(fn)
        try:
            h.update(inspect.getsource(fn).encode())
        except (OSError, TypeError):  # no source file (exec, some notebooks): the compiled code, stable across runs
            h.update(repr((fn.__code__.co_code, fn.__code__.co_consts)).encode())
        cells = dict(zip(fn.__code__.co_freevars, [c.cell_contents for c in fn.__closure__ or ()]))
        scope, codes, names = {**fn.__globals__, **cells}, [fn.__code__], set()
        while codes:  # comprehensions and nested functions have code objects of their own
            code = codes.pop()
            names |= {*code.co_names, *code.co_freevars}
            codes += [c for c in code.co_consts if isinstance(c, types.CodeType)]
        for name in sorted(names & set(scope)):
            value = scope[name]
            if isinstance(value, types.FunctionType) and value.__module__ == fn.__module__ and value not in seen:
                todo.append(value)
            elif isinstance(value, (str, int, float, tuple, list, dict, set, frozenset)):
                shown = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
                h.update(f"{name}={shown!r}".encode())
    return h.hexdigest()[:20]


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(2**24):
            h.update(block)
    return h.hexdigest()[:20]


def folder_sha256(path: str) -> str:
    """sha256 over the files of a model folder (weights, config, tokenizer), not its subfolders."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if os.path.isfile(os.path.join(path, name)):
            h.update(f"{name}={file_sha256(os.path.join(path, name))}".encode())
    return h.hexdigest()[:20]


def run_fingerprints(args, reward_fn, data_files: list, splits: dict) -> dict:
    """What the run is built from, for --resume to refuse a change: the number of processes and the global batch
    (they set the schedule), the reward function's code, the data as read (`splits`, every task's) and each data
    file's sha256 (the --train-file, --val-file, --test-file given, else the task's own), and the files of every
    model read so far by a --...-model flag (the policy or LoRA base and the reward models, which preflight has
    called)."""
    files = [getattr(args, f"{s}_file") for s in ("train", "val", "test")] if args.train_file else data_files
    flags = [k for k in vars(args) if k.endswith("model") and getattr(args, k) in models.read]
    return {"processes": world()[1], "global batch": args.batch_size * args.grad_accum * world()[1],
            "reward function code": code_fingerprint(reward_fn),
            "data": hashlib.sha256(json.dumps({name: [{k: v for k, v in r.items() if k != "source"} for r in records]
                                               for name, records in splits.items()},  # source: where, not what
                                              sort_keys=True).encode()).hexdigest()[:20],
            **{f"--{k.replace('_', '-')} files": folder_sha256(models.read[getattr(args, k)]) for k in flags},
            **{f: file_sha256(f) for f in files}}


def frozen(ref, train: dict, val: dict, reward_fn, args, compute) -> dict:
    """compute() -> the frozen reference's quantities, computed once and cached in --cache-dir.

    The cache key (the silent-bug class of huggingface/trl#1962) covers the reference's weights, the tokens of the
    training and validation data, the settings in FROZEN_SETTINGS (the batch size among them: it sets the batches of
    V's sampled targets) and the source of the reward function and of what it calls in its own module
    (`code_fingerprint`), not the rest of its file. Reward models given by path are covered by their path.
    """
    settings = {k: getattr(args, k) for k in FROZEN_SETTINGS}
    settings["reward_code"] = code_fingerprint(reward_fn)  # V is fitted to its scores
    layout = {k: train[k] for k in ("input_ids", "response_mask", "prompt_mask")}
    if "rejected" in train:  # pairs: the key covers the dispreferred replies too
        layout.update({f"rejected_{k}": train["rejected"][k] for k in ("input_ids", "response_mask", "prompt_mask")})
    key = fingerprint(ref, layout, {"val": val["input_ids"]}, settings)
    path = os.path.join(args.cache_dir, f"frozen-{key}.pt")
    if os.path.exists(path):
        try:  # the file carries its key and a checksum of its contents: a truncated or altered file is not used
            cached = torch.load(path, weights_only=True)
            intact = cached.pop("checksum") == fingerprint(cached) and cached["key"] == key
        except Exception:
            intact = False
        if intact:
            print(f"reference log-probs and V(x): loaded from cache {path}")
            return cached
        print(f"warning: cache file {path} is truncated or altered: computing it again")
    computed = {**compute(), "key": key}
    os.makedirs(args.cache_dir, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({**computed, "checksum": fingerprint(computed)}, buffer)
    write_atomic(path, buffer.getvalue())
    print(f"reference log-probs and V(x): computed and cached in {path}")
    return computed


def scored_splits(cache: str, names: tuple, build, make_reward):
    """The splits `names` (from build()) and the reward function (make_reward(splits)); the splits are scored once
    and cached as JSONL in this project's schema in the folder `cache`, and the next run reads them back (they work
    as --train-file, --val-file, --test-file). checksums.json, written last, holds each file's sha256: a truncated
    or altered cache is made again."""
    files = {name: os.path.join(cache, f"{name}.jsonl") for name in names}
    try:
        cached = json.load(open(os.path.join(cache, "checksums.json"))) == {n: file_sha256(f) for n, f in files.items()}
    except (OSError, ValueError):
        cached = False
    if os.path.isdir(cache) and not cached:
        print(f"warning: the data cache {cache} is incomplete or altered: preparing and scoring it again")
    parts = {name: read_jsonl(path, "cached data") for name, path in files.items()} if cached else build()
    empty = [name for name in names if not parts[name]]
    if empty:  # fails the first run, not every later one that reads the cache back
        raise AlolError(f"the task's {empty[0]} split holds no examples after parsing; nothing is cached")
    reward_fn = make_reward(parts)
    if not cached:
        add_rewards(parts, reward_fn)
        os.makedirs(cache, exist_ok=True)
        for name, path in files.items():
            write_atomic(path, "".join(json.dumps(r) + "\n" for r in parts[name]))
        write_atomic(os.path.join(cache, "checksums.json"), json.dumps({n: file_sha256(f) for n, f in files.items()}))
    print(f"data {'read from' if cached else 'prepared, scored and cached in'} {cache}: "
          + ", ".join(f"{name} {len(parts[name])}" for name in names))
    return parts, reward_fn
