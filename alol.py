"""A-LoL (Advantage-Leftover-Lunch RL) in one file: offline policy-gradient training of a language model on
pre-existing data, with a sequence-level reward, a value estimate from the frozen reference policy, training
only on positive-advantage examples, and a clipped sequence importance weight.

Paper: Baheti et al., "Leftover-Lunch: Advantage-based Offline Reinforcement Learning for Language Models",
ICLR 2024, https://arxiv.org/abs/2305.14718. The tutorial (tutorial.md) follows the numbered sections below:
settings (1), then A-LoL itself in the order it runs (2-8), `main` (9), and last the task recipes (10) and the
plumbing (11) that any section may call.

    python alol.py                  # embedded offline task `toy`: reference, nll and a_lol in ~2 min on 2 CPU cores
    python alol.py --algo all       # all eight losses from the same reference
    python alol.py --task reddit    # the paper's Reddit task with DialoGPT-medium, on one GPU (README)
    python alol.py --task hh        # the paper's Anthropic HH task with Qwen2.5-0.5B, on one GPU (README)
    torchrun --standalone --nproc_per_node 2 alol.py    # data parallel: one process per GPU (gloo on CPU)
    python alol.py --help           # every setting, grouped
"""
import argparse
import contextlib
import dataclasses
import functools
import gzip
import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import math
import os
import random
import re
import shlex
import shutil
import socket
import sys
import tempfile
import textwrap
import time
import traceback
import types
import urllib.parse
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

import kernels

transformers.utils.logging.disable_progress_bar()  # per-file load/save bars would drown ours


# ---------------------------------------------------------------------------------------------------------------
# 1. Settings
# ---------------------------------------------------------------------------------------------------------------
def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    # run
    task: str = opt("toy", "task preset: `toy` is embedded and offline; `reddit` is the paper's (needs --data-dir)")
    algo: str = opt("nll,a_lol", "comma list of methods trained from the same reference, or `all`")
    seed: int = opt(0, "seed for data, initialisation, sampling order and generation")
    out_dir: str = opt("", "run directory (default runs/<task>-seed<seed>-<time>)")
    overwrite: bool = opt(False, "replace an --out-dir that holds a different run")
    resume: bool = opt(False, "continue the run in --out-dir from its last checkpoints")
    cache_dir: str = opt(".cache/alol", "where reference log-probs and V(x) are cached between runs")
    device: str = opt("auto", "auto (cuda if available), cpu or cuda")
    kernel: str = opt("auto", "log-prob backend of kernels/: auto (Triton on CUDA), torch or triton")
    bf16: bool = opt(True, "bf16 autocast on CUDA; log-probs, ratios and the loss stay fp32")
    report_to: str = opt("tensorboard", "comma list of trackers for every training step and validation: tensorboard, "
                         "wandb, trackio, or none (log.jsonl and curves.png are always written)")
    # data
    train_file: str = opt("", "JSONL with prompt, response and reward (or a dict `rewards`); replaces the task's data")
    val_file: str = opt("", "JSONL of the same form; its prompts train the value head")
    test_file: str = opt("", "JSONL of the same form; its prompts are generated on for evaluation")
    data_dir: str = opt("data/reddit", "reddit: folder with Kaggle's comments_positive.csv and comments_negative.csv")
    reddit_train: str = opt("pos", "reddit: train on the upvoted (pos) or the downvoted (neg) replies")
    n_train: int = opt(8000, "training examples: toy generates this many; reddit keeps at most this many (0 = all)")
    n_val: int = opt(600, "validation examples (value-head prompts); reddit: per CSV file")
    n_test: int = opt(400, "test examples (toy: prompts unseen in training); reddit: per CSV file")
    max_prompt_len: int = opt(24, "prompt tokens kept (left-truncated: the end of the prompt matters most)")
    max_response_len: int = opt(32, "response tokens kept incl. the final EOS (right-truncated)")
    hh_dataset: str = opt("Anthropic/hh-rlhf", "hh: Hugging Face dataset id, or a folder of its layout (<subset>/"
                          "train.jsonl.gz, test.jsonl.gz); n_val are held out of train, n_test taken per test subset")
    hh_train: str = opt("chosen", "hh: offline replies: `chosen` (the paper's) or `both`, chosen and rejected pooled")
    # rewards
    reward_fn: str = opt("", "`module:function` scoring (prompts, responses) -> {name: tensor in [0, 1]}")
    fluency_model: str = opt("textattack/roberta-base-CoLA", "reddit fluency: P(acceptable) of the response")
    safety_model: str = opt("cardiffnlp/twitter-roberta-base-offensive", "reddit safety: P(not offensive) of the reply")
    depth_model: str = opt("microsoft/DialogRPT-depth", "reddit engagement: sigmoid(DialogRPT) of parent+reply")
    updown_model: str = opt("microsoft/DialogRPT-updown", "reddit upvotes: sigmoid(DialogRPT) of parent+reply")
    hh_reward_model: str = opt("OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5", "hh: sigmoid of this reward model "
                               "(the paper's for train and validation; or any one-logit sequence classifier)")
    # reference policy
    model: str = opt("", "Hugging Face id or path of the initial policy; empty = the task's own tiny GPT-2")
    ref_model: str = opt("", "path of a trained reference policy; skips the NLL reference stage")
    ref_epochs: int = opt(3, "epochs of NLL on the training data that make the reference (the paper's recipe)")
    ref_lr: float = opt(1e-3, "learning rate of the reference stage")
    # value estimate
    value_samples: int = opt(8, "reference samples per validation prompt; V's target is their mean reward")
    value_epochs: int = opt(30, "value-head epochs; the best held-out epoch is kept")
    value_lr: float = opt(1e-3, "value-head learning rate")
    # A-LoL training
    epochs: int = opt(2, "epochs of each method over its training set (the kept set for A-LoL variants)")
    lr: float = opt(1e-3, "learning rate of each method")
    batch_size: int = opt(64, "sequences per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimiser step (the update equals one batch_size*grad_accum batch)")
    weight_decay: float = opt(0.01, "AdamW weight decay (official: 0.01)")
    max_grad_norm: float = opt(1.0, "gradient-norm clip (official: 1.0)")
    clip_eps: float = opt(0.9, "importance weight clipped to [1-eps, 1+eps]; `none` = no clip (official HH: 0.9)")
    kl_beta: float = opt(0.1, "beta of a_lol_kl")
    priority_sampling: bool = opt(True, "A-LoL variants: keep A>0 only and sample prob ~ A+ (the official -ts option)")
    save_every: int = opt(100, "optimiser steps between checkpoints (always saved at the end)")
    # bigger models
    lora_r: int = opt(0, "LoRA rank (peft): train adapters on a frozen base instead of every weight; 0 = full training")
    lora_alpha: float = opt(16.0, "LoRA scale alpha (the update is alpha/r * B A)")
    lora_dropout: float = opt(0.0, "LoRA dropout; keep 0: dropout would make the ratio pi/pi_ref differ from 1 at step 0")
    lora_targets: str = opt("all-linear", "modules that get adapters (peft's target_modules; a comma list of names, or "
                            "all-linear: every linear layer but the output layer)")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass: less memory, ~30% slower")
    # evaluation
    eval_every: float = opt(0.0, "validation reward (deterministic decode) every N optimiser steps, keeping the best "
                            "checkpoint for the final evaluation; a value below 1 is a share of an epoch; 0 = off")
    eval_max_new_tokens: int = opt(32, "generated tokens per test prompt, and per reference sample for V(x)")
    eval_num_beams: int = opt(1, "beams of the deterministic decode (1 = greedy)")
    eval_repetition_penalty: float = opt(1.0, "repetition penalty of the deterministic decode")
    eval_batch_size: int = opt(200, "sequences per batch of every pass without gradient: generation (test and V's "
                               "samples), reward models, reference log-probs and V(x)")


ARG_GROUPS = {"task": "run", "train_file": "data", "reward_fn": "rewards", "model": "reference policy",
              "value_samples": "value estimate", "epochs": "A-LoL training", "lora_r": "bigger models",
              "eval_every": "evaluation"}
# Task presets override Args defaults. The defaults above are the toy's: sizes measured so that `python alol.py`
# takes under 2 minutes on 2 CPU cores (README).
TASK_PRESETS = {
    "toy": {},
    # The paper's settings (official README commands and trainer): DialoGPT-medium, NLL reference 6 epochs, methods
    # 3 epochs, lr 2e-5, batch 8 x 2, val/test 1000 per file, beam 2 with repetition penalty 2.5. For one 24 GB GPU:
    # bf16 autocast over fp32 weights and AdamW (~6 GB), no [B, T, V] logits (kernels/), sequences <= 300 tokens.
    "reddit": dict(model="microsoft/DialoGPT-medium", n_train=0, n_val=1000, n_test=1000, max_prompt_len=512,
                   max_response_len=128, ref_epochs=6, ref_lr=2e-5, epochs=3, lr=2e-5, batch_size=8, grad_accum=2,
                   value_samples=2, value_epochs=5, value_lr=2e-5, save_every=1000, eval_every=0.5,
                   eval_max_new_tokens=128, eval_num_beams=2, eval_repetition_penalty=2.5, eval_batch_size=32),
    # The paper's HH settings (lolrl_qlora_llama_hh.py): prompts 640 tokens, responses 128, batch 4 x 4, grad-norm 0.3,
    # no weight decay, value head 10 epochs at lr 1e-5, greedy test decode of 128 tokens, kl_beta 0.2 (its README).
    # The policy is Qwen2.5-0.5B trained in full (LLaMA-7B with QLoRA in the paper): README, "--task hh".
    "hh": dict(model="Qwen/Qwen2.5-0.5B", n_train=0, n_val=1000, n_test=500, max_prompt_len=640, max_response_len=128,
               ref_epochs=1, ref_lr=1e-5, epochs=1, lr=1e-5, batch_size=4, grad_accum=4, weight_decay=0.0,
               max_grad_norm=0.3, kl_beta=0.2, value_samples=2, value_epochs=10, value_lr=1e-5, save_every=1000,
               eval_max_new_tokens=128, eval_batch_size=32),
}
ALGOS = ["nll", "wbc", "r_gold", "r_lol", "a_lol", "a_lol_ref_free", "a_lol_seq", "a_lol_kl"]
REWARD_MODELS = ("fluency_model", "safety_model", "depth_model", "updown_model")
# Settings that may differ when --resume adds methods to or re-evaluates an existing run.
NOT_RUN_IDENTITY = {"algo", "resume", "overwrite", "out_dir", "device", "kernel", "cache_dir", "report_to"}
RUN_MARKER = "alol_run"  # a key of config.json that only alol writes: --overwrite deletes no folder without it


class AlolError(Exception):
    """A user-facing error: printed as one line, no traceback."""


def parse_args(argv=None) -> Args:
    def optional_float(s):
        return None if s.lower() == "none" else float(s)

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    choices = {"task": list(TASK_PRESETS), "kernel": ["auto", "torch", "triton"], "reddit_train": ["pos", "neg"],
               "hh_train": ["chosen", "both"]}
    group = p
    for f in fields(Args):
        group = p.add_argument_group(ARG_GROUPS[f.name]) if f.name in ARG_GROUPS else group
        flag, kind = "--" + f.name.replace("_", "-"), type(f.default)
        help = f.metadata["help"] + ("" if f.default == "" else " (default: %(default)s)")
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help)
        else:
            group.add_argument(flag, type=optional_float if f.name == "clip_eps" else kind, default=f.default,
                               help=help, choices=choices.get(f.name))
    pre = argparse.ArgumentParser(add_help=False)  # the task first: its preset sets the defaults --help shows
    pre.add_argument("--task", default=Args.task)
    p.set_defaults(**TASK_PRESETS.get(pre.parse_known_args(argv)[0].task, {}))
    args = Args(**vars(p.parse_args(argv)))
    algos = args.algo.split(",")
    unknown = [a for a in algos if a not in ALGOS + ["all"]]
    if unknown:
        p.error(f"unknown --algo {','.join(unknown)!r}; choose from {', '.join(ALGOS)} or all")
    if len(set(algos)) < len(algos) or ("all" in algos and len(algos) > 1):
        p.error("--algo names each method once, or is `all` alone")
    if args.clip_eps is not None and not (math.isfinite(args.clip_eps) and args.clip_eps > 0):
        p.error("--clip-eps must be a finite number > 0, or `none` for no clipping")
    positive = ("lr", "ref_lr", "value_lr", "max_grad_norm", "eval_repetition_penalty", "lora_alpha")
    non_negative = ("weight_decay", "kl_beta", "lora_dropout", "lora_r")
    for k in positive + non_negative:  # a negative clip norm or decay silently ascends the loss; NaN spreads
        value = getattr(args, k)
        if not math.isfinite(value) or value < 0 or (value == 0 and k in positive):
            p.error(f"--{k.replace('_', '-')} must be a finite number {'> 0' if k in positive else '>= 0'}")
    if set(args.report_to.split(",")) - {"none", "tensorboard", "wandb", "trackio"}:
        p.error(f"--report-to {args.report_to!r}: a comma list of tensorboard, wandb, trackio, or none")
    if not 0 <= args.eval_every < math.inf or (args.eval_every > 1 and args.eval_every % 1):
        p.error("--eval-every must be a whole number of steps, a share of an epoch below 1, or 0")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        p.error(f"--device {args.device!r}: choose auto, cpu, cuda or cuda:N")
    if args.device.startswith("cuda") and int(args.device.partition(":")[2] or 0) >= torch.cuda.device_count():
        p.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    sizes = ["epochs", "ref_epochs", "batch_size", "grad_accum", "value_samples", "n_val", "n_test", "max_prompt_len",
             "max_response_len", "save_every", "eval_max_new_tokens", "eval_num_beams", "eval_batch_size"]
    too_small = [k for k in sizes + ["n_train"] * (args.task == "toy") if getattr(args, k) < 1]
    if too_small:
        p.error(f"--{too_small[0].replace('_', '-')} must be at least 1")
    files = [args.train_file, args.val_file, args.test_file]
    if any(files) and not all(files):
        p.error("--train-file, --val-file and --test-file go together")
    return args


# ---------------------------------------------------------------------------------------------------------------
# 2. Data: records {prompt, response, rewards: {component: float}}, their rewards and their token layout
# ---------------------------------------------------------------------------------------------------------------
def score(reward_fn, prompts: list, responses: list) -> dict:
    """reward_fn(prompts, responses) -> {component: tensor in [0, 1]}, checked, plus their sum R under `reward`.
    One call (reward models load once), or one per process under torchrun, each on its share of the examples."""
    name = getattr(reward_fn, "__qualname__", repr(reward_fn))

    def call(pairs, position):
        n = len(pairs)
        try:
            out = reward_fn([p for p, _ in pairs], [r for _, r in pairs])
            components = {k: torch.as_tensor(v, dtype=torch.float).cpu() for k, v in out.items()} if isinstance(out, dict) else {}
        except AlolError:
            raise
        except Exception as e:
            raise AlolError(f"reward function {name} failed on {n} examples: {type(e).__name__}: {e}") from None
        if not components or not all(isinstance(k, str) for k in components):
            raise AlolError(f"reward function {name} returned {str(out)[:80]}; expected {{name: {n} values in [0, 1]}}")
        for key, v in components.items():
            if v.shape != (n,) or not torch.isfinite(v).all() or v.min() < 0 or v.max() > 1:
                raise AlolError(f"reward function {name}: component {key!r} must be {n} finite values in [0, 1], got "
                                f"{str(v.tolist())[:80]}")
        return components

    shares = shard_map(call, list(zip(prompts, responses)), max(1, math.ceil(len(prompts) / world()[1])), "reward")
    components = {k: torch.cat([share[k] for share in shares]) for k in shares[0]}
    return {**components, "reward": sum(components.values())}


def add_rewards(splits: dict, reward_fn) -> dict:
    """Score every record in one call of reward_fn (its models load once) and store the components."""
    records = [r for split in splits.values() for r in split]
    if not records:  # nothing to score: preflight names the empty split
        return splits
    scores = score(reward_fn, [r["prompt"] for r in records], [r["response"] for r in records])
    columns = {k: v.tolist() for k, v in scores.items() if k != "reward"}
    for i, r in enumerate(records):
        r["rewards"] = {k: v[i] for k, v in columns.items()}
    return splits


def encode(records: list, tok, args: Args) -> dict:
    """One right-padded layout [prompt][response EOS][pad...] for training, scoring and the value head.

    Position t of every [N, L] tensor describes token t; `response_mask[:, t]` marks the response tokens (incl.
    the final EOS) built from lengths, never from `ids != pad` (GPT-2's pad is its EOS, and EOS is trained).
    Right padding keeps GPT-2's positions 0..len-1 as in generate(), unlike the official left-padded prompt
    (tutorial.md, section 2).
    """
    prompts = tok([r["prompt"] for r in records], add_special_tokens=False)["input_ids"]
    responses = tok([r["response"] for r in records], add_special_tokens=False)["input_ids"]
    seqs = [(p[-args.max_prompt_len:], r[:args.max_response_len - 1] + [tok.eos_token_id])
            for p, r in zip(prompts, responses)]
    n, width = len(seqs), max(len(p) + len(r) for p, r in seqs)
    data = {"input_ids": torch.full((n, width), tok.pad_token_id, dtype=torch.long),
            "prompt_mask": torch.zeros(n, width, dtype=torch.bool),
            "response_mask": torch.zeros(n, width, dtype=torch.bool)}
    for i, (p, r) in enumerate(seqs):
        data["input_ids"][i, :len(p) + len(r)] = torch.tensor(p + r)
        data["prompt_mask"][i, :len(p)] = True
        data["response_mask"][i, len(p):len(p) + len(r)] = True
    data["attention_mask"] = data["prompt_mask"] | data["response_mask"]
    data["reward"] = torch.tensor([sum(r["rewards"].values()) for r in records], dtype=torch.float)  # (N,) R
    return data


def take(data: dict, idx: torch.Tensor, device="cpu") -> dict:
    """Rows `idx` of every tensor, cut to the longest of those rows, on `device`."""
    width = int(data["attention_mask"][idx].sum(1).max())
    return {k: (v[idx, :width] if v.dim() == 2 else v[idx]).to(device) for k, v in data.items()}


# ---------------------------------------------------------------------------------------------------------------
# 3. Policies: per-token log-probs log pi(y_t | x, y_<t), and generation
# ---------------------------------------------------------------------------------------------------------------
def disable_dropout(model: nn.Module) -> nn.Module:
    """Dropout off in every pass: pi/pi_ref must be exactly 1 at step 0 when theta = ref (huggingface/trl#744)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def autocast(args: Args):
    """bf16 matmuls on CUDA; the log-prob kernel still accumulates logits, log-sum-exp and sums in fp32."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.bf16 and args.device.startswith("cuda"))


def hidden_states(model, batch: dict, args: Args):
    """Last-layer hidden states [B, T, H] of a right-padded batch; positions 0..len-1 in every row, as in generate()."""
    ids = batch["input_ids"]
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    with autocast(args):
        out = model.base_model(input_ids=ids, attention_mask=batch["attention_mask"], position_ids=positions,
                               use_cache=False)  # no key/value cache: nothing is generated from these states
    return out.last_hidden_state


def token_logprobs(model, batch: dict, args: Args, hidden=None):
    """log pi(y_t | x, y_<t) of every response token, fp32 [B, T] aligned with the tokens, 0 elsewhere.

    The LM head runs inside kernels.linear_token_logprobs, which never materialises the [B, T, V] logits.
    """
    hidden = hidden_states(model, batch, args) if hidden is None else hidden  # (B, T, H)
    lm_head = model.get_output_embeddings()
    # hidden[:, t] scores token t+1: shift here, the kernel expects aligned targets.
    with autocast(args):
        logp = kernels.linear_token_logprobs(hidden[:, :-1], lm_head.weight, batch["input_ids"][:, 1:],  # (B, T-1)
                                             batch["response_mask"][:, 1:], bias=lm_head.bias, backend=args.kernel)
    return F.pad(logp, (1, 0))  # (B, T): no token scores the first one


@torch.no_grad()
def generate(model, tok, prompts: list, args: Args, sample: bool) -> list:
    """Pure sampling (temperature 1, no top-k/top-p: the policy's own distribution) or the deterministic decode,
    in batches of --eval-batch-size (shared out over the processes under torchrun)."""
    model.eval()
    if sample:
        decode = {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0}
    else:
        decode = {"do_sample": False, "num_beams": args.eval_num_beams,
                  "repetition_penalty": args.eval_repetition_penalty}
    # Left padding and left truncation: new tokens are appended at the right end (encode() pads on its own).
    tok.padding_side = tok.truncation_side = "left"

    def decode_batch(batch, k):
        with torch.random.fork_rng(devices=[args.device] if args.device.startswith("cuda") else []):
            torch.manual_seed(args.seed + k)  # batch k's draws: the same whatever ran before, on any process
            enc = tok(batch, return_tensors="pt", padding=True, truncation=True, max_length=args.max_prompt_len,
                      add_special_tokens=False).to(args.device)
            out = model.generate(**enc, max_new_tokens=args.eval_max_new_tokens, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id, **decode)
        return [r.strip() for r in tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]

    return [r for batch in shard_map(decode_batch, prompts, args.eval_batch_size, "generate") for r in batch]


# ---------------------------------------------------------------------------------------------------------------
# 4. Value estimate V(x): expected reward of pi_ref on prompt x
# ---------------------------------------------------------------------------------------------------------------
VALUE_HELDOUT_SHARE = 0.1  # of the validation prompts, to pick the epoch: V must generalise to the training prompts
VALUE_BATCH_SIZE = 32  # prompts per value-head step: the head is small and its targets noisy, so small batches
VALUE_HEADS = 8  # attention heads of the pooling (fewer when the hidden size is not a multiple of 8)


class ValueHead(nn.Module):
    """Attention pooling of the frozen reference's last hidden states over the prompt (the official
    ValueHeadAttention), with a key-padding mask so V(x) does not depend on padding; sigmoid * max_value."""

    def __init__(self, hidden_size: int, max_value: float):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, hidden_size) / hidden_size ** 0.5)
        self.attn = nn.MultiheadAttention(hidden_size, math.gcd(VALUE_HEADS, hidden_size), batch_first=True)
        self.out, self.max_value = nn.Linear(hidden_size, 1), max_value

    def forward(self, hidden, prompt_mask):  # (B, T, H), (B, T) -> (B,)
        query = self.query.expand(hidden.shape[0], -1, -1).to(hidden.dtype)
        pooled = self.attn(query, hidden, hidden, key_padding_mask=~prompt_mask, need_weights=False)[0]  # (B, 1, H)
        return torch.sigmoid(self.out(pooled[:, 0]).squeeze(-1).float()) * self.max_value


def train_value_head(ref, tok, val_records: list, reward_fn, args: Args):
    """As the paper: V is trained with MSE on the rewards of reference samples for validation prompts. Departures
    from the official code: the target is the mean of `value_samples` samples, and the epoch is chosen on a held-out
    share of the prompts rather than on training MSE. Returns the head and a report of its fit."""
    prompts = sorted({r["prompt"] for r in val_records})  # 2 or more (preflight): one is held out
    repeated = [p for p in prompts for _ in range(args.value_samples)]
    scores = score(reward_fn, repeated, generate(ref, tok, repeated, args, sample=True))
    target = scores["reward"].view(len(prompts), args.value_samples).mean(1)  # (P,) Monte-Carlo V_ref(x)
    # Causal attention: the prompt positions' hidden states are the same with or without a response after them.
    data = encode([{"prompt": p, "response": "", "rewards": {}} for p in prompts], tok, args)
    perm = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed))
    n_held = max(1, int(len(prompts) * VALUE_HELDOUT_SHARE))
    held, fit = perm[:n_held], perm[n_held:]
    max_value = len(scores) - 1  # every component lies in [0, 1]
    value_head = ValueHead(ref.config.hidden_size, max_value).to(args.device)
    with torch.no_grad():  # start at the mean target: the sigmoid then only has to learn the differences
        value_head.out.bias.fill_(torch.logit(target[fit].mean() / max_value, eps=1e-4).item())
    # No weight decay: a few thousand parameters fitted to a few hundred targets, with the epoch picked on held-out MSE.
    optim = torch.optim.AdamW(value_head.parameters(), lr=args.value_lr, weight_decay=0.0)

    def mse(idx, train):
        batch = take(data, idx, args.device)
        with torch.set_grad_enabled(train):
            with torch.no_grad():  # recomputed per batch: storing [P, T, H] would take GBs for Reddit's 2000 prompts
                hidden = hidden_states(ref, batch, args).float()  # (b, T, H) of the frozen reference
            loss = F.mse_loss(value_head(hidden, batch["prompt_mask"]), target[idx].to(args.device))
        if train:
            optim.zero_grad()
            loss.backward()
            optim.step()
        return loss.item()

    best = (mse(held, False), 0, {k: v.clone() for k, v in value_head.state_dict().items()})
    for epoch in tqdm(range(1, args.value_epochs + 1), desc="value head", leave=False, disable=None):
        for chunk in fit[torch.randperm(len(fit))].split(VALUE_BATCH_SIZE):
            mse(chunk, True)
        if (held_mse := mse(held, False)) < best[0]:
            best = (held_mse, epoch, {k: v.clone() for k, v in value_head.state_dict().items()})
    value_head.load_state_dict(best[2])
    fit_report = {"heldout_mse": best[0], "best_epoch": best[1], "prompts": len(prompts),
                  "heldout_mse_of_mean": (target[held] - target[fit].mean()).pow(2).mean().item(),
                  "ref_sample_reward": target.mean().item()}
    return value_head.eval(), fit_report


# ---------------------------------------------------------------------------------------------------------------
# 5. Advantages A = R - V(x): the frozen reference's log-probs and V(x), computed once and cached
# ---------------------------------------------------------------------------------------------------------------
# What the cached log-probs and V(x) depend on besides the reference's weights, the data and the reward code.
FROZEN_SETTINGS = ("seed", "value_samples", "value_epochs", "value_lr", "max_prompt_len", "max_response_len",
                   "eval_max_new_tokens", "eval_batch_size", "reward_fn", "task", "device", "bf16", "kernel",
                   *REWARD_MODELS)


def frozen_quantities(ref, tok, train: dict, val_records: list, reward_fn, args: Args) -> dict:
    """Per-token reference log-probs [N, T] and V(x) [N] for every training example, computed once.

    Valid because pi_ref and the data are both fixed: one model in memory instead of the official second copy run
    every step. The cache key (the silent-bug class of huggingface/trl#1962) covers the reference's weights, the
    tokens of the training and validation data, the settings in FROZEN_SETTINGS (the batch size among them: it
    sets the batches of V's sampled targets) and the source of the reward function and of what it calls in its own
    module (`code_fingerprint`), not the rest of its file. Reward models given by path are covered by their path.
    """
    settings = {k: getattr(args, k) for k in FROZEN_SETTINGS}
    settings["reward_code"] = code_fingerprint(reward_fn)  # V is fitted to its scores
    val_ids = encode(val_records, tok, args)["input_ids"]
    layout = {k: train[k] for k in ("input_ids", "response_mask", "prompt_mask")}
    key = fingerprint(ref, layout, {"val": val_ids}, settings)
    path = os.path.join(args.cache_dir, f"frozen-{key}.pt")
    if os.path.exists(path):
        try:  # the file carries its key and a checksum of its contents: a truncated or altered file is not used
            frozen = torch.load(path, weights_only=True)
            intact = frozen.pop("checksum") == fingerprint(frozen) and frozen["key"] == key
        except Exception:
            intact = False
        if intact:
            print(f"reference log-probs and V(x): loaded from cache {path}")
            return frozen
        print(f"warning: cache file {path} is truncated or altered: computing it again")
    value_head, fit_report = train_value_head(ref, tok, val_records, reward_fn, args)
    ref_logp, value = torch.zeros(train["input_ids"].shape), torch.zeros(len(train["reward"]))

    @torch.no_grad()
    def reference_pass(idx, position):
        batch = take(train, torch.tensor(idx), args.device)
        hidden = hidden_states(ref, batch, args)  # (b, T, H): one pass gives log-probs and V's input
        return token_logprobs(ref, batch, args, hidden).cpu(), value_head(hidden.float(), batch["prompt_mask"]).cpu()

    indices = list(range(len(value)))
    for idx, (logp, v) in zip(torch.arange(len(value)).split(args.eval_batch_size),
                              shard_map(reference_pass, indices, args.eval_batch_size, "reference log-probs")):
        ref_logp[idx, :logp.shape[1]], value[idx] = logp, v  # (b, T) log pi_ref, (b,) V(x)
    frozen = {"ref_logp": ref_logp, "value": value, "value_report": fit_report, "key": key}
    os.makedirs(args.cache_dir, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({**frozen, "checksum": fingerprint(frozen)}, buffer)
    write_atomic(path, buffer.getvalue())
    print(f"reference log-probs and V(x): computed and cached in {path}")
    return frozen


def advantage_stats(advantage: torch.Tensor) -> dict:
    q = torch.quantile(advantage, torch.tensor([0.1, 0.5, 0.9]))
    return {"mean": advantage.mean().item(), "std": advantage.std().item(), "min": advantage.min().item(),
            "p10": q[0].item(), "median": q[1].item(), "p90": q[2].item(), "max": advantage.max().item(),
            "frac_positive": (advantage > 0).float().mean().item()}


# ---------------------------------------------------------------------------------------------------------------
# 6. The loss family
# ---------------------------------------------------------------------------------------------------------------
def alol_loss(logp, ref_logp, mask, reward, value, algo="a_lol", clip_eps=0.9, kl_beta=0.1, return_stats=False):
    """A-LoL and its baselines (Baheti et al., ICLR 2024, https://arxiv.org/abs/2305.14718).

    Formula (A-LoL):  loss = -(1/B) sum_b  sg[clip(rho_b, 1-eps, 1+eps)] * A+_b * sum_t m_bt * logp_bt
    Where: rho_b = pi_theta(y|x) / pi_ref(y|x) = exp(sum_t m_bt (logp_bt - ref_logp_bt)), A+_b = max(R_b - V_b, 0),
    sg = stop-gradient. Other algos change the weight (official train_generation_task_with_off_policy_PG.py):
    nll 1, wbc R, r_gold R * sg[max(pi_t, 0.1)] per token, r_lol sg[clip(rho)] * R, a_lol_ref_free A+,
    a_lol_seq A+ * sg[clip(rho_t)] per token, a_lol_kl A+ plus beta * (log pi_theta(y|x) - log pi_ref(y|x)).
    Shapes: logp (with grad), ref_logp, mask: [B, T]; reward R, value V: [B]. Returns a scalar; the sum over
    tokens is not length-normalised. clip_eps=None: no clip. With return_stats, also {ratio, clip_frac, adv}.
    """
    if clip_eps is not None and clip_eps <= 0:
        raise ValueError("clip_eps must be > 0, or None for no clipping")
    gold_min_prob = 0.1  # GOLD's lower bound on pi_theta(y_t) (Pang & He, ICLR 2021), as the official r_gold
    no_clip_bound = 20.0  # |log rho| cap without a clip: exp(20) ~ 5e8 is finite in fp32, a 128-token sum is not
    tokens = mask.bool()
    reward, value = reward.detach(), value.detach()  # constants, whatever the caller passes
    logp, ref_logp = logp.masked_fill(~tokens, 0.0), ref_logp.detach().masked_fill(~tokens, 0.0)  # masked entries: 0
    token_log_ratio = logp.detach() - ref_logp  # (B, T) log rho_t; weights are constants in autograd
    log_ratio = token_log_ratio if algo == "a_lol_seq" else token_log_ratio.sum(-1)  # (B, T) or (B,)
    # Clamp in log space before exp: a 128-token sum overflows exp() (inf * 0 = NaN at A = 0). For eps < 1 this is
    # exactly clip(exp(.), 1-eps, 1+eps); with no clip, the bound is a guard the official code lacks (OpenRLHF#1293).
    if clip_eps is None:
        lo, hi = -no_clip_bound, no_clip_bound
    else:
        lo, hi = math.log(1 - clip_eps) if clip_eps < 1 else -math.inf, math.log1p(clip_eps)
    ratio = log_ratio.clamp(lo, hi).exp()  # (B,) or (B, T)
    adv = (reward - value).clamp(min=0)  # (B,) A+
    match algo:  # the weight of each sequence's (or token's) log-prob; a constant in autograd
        case "nll": weight = torch.ones_like(reward)  # (B,)
        case "wbc": weight = reward
        case "r_gold": weight = reward[:, None] * logp.detach().exp().clamp(min=gold_min_prob)  # (B, T)
        case "r_lol": weight = ratio * reward
        case "a_lol": weight = ratio * adv
        case "a_lol_ref_free" | "a_lol_kl": weight = adv
        case "a_lol_seq": weight = adv[:, None] * ratio  # (B, T) per-token ratios, not their product
        case _: raise ValueError(f"unknown algo {algo!r}")
    loss = -((weight if weight.dim() == 2 else weight[:, None]) * logp).sum(-1).mean()
    if algo == "a_lol_kl":  # + beta * log(pi_theta(y|x) / pi_ref(y|x)) on the data response, with gradient
        loss = loss + kl_beta * (logp - ref_logp).sum(-1).mean()
    if not return_stats:
        return loss
    counted = tokens if ratio.dim() == 2 else torch.ones_like(ratio, dtype=torch.bool)  # real tokens, or sequences
    clipped = ((log_ratio < lo) | (log_ratio > hi))[counted]
    return loss, {"ratio": ratio[counted].mean().item(), "clip_frac": clipped.float().mean().item(),
                  "adv": adv.mean().item()}


# ---------------------------------------------------------------------------------------------------------------
# 7. Training: the sampling schedule, one optimiser step, the loop with its checkpoints
# ---------------------------------------------------------------------------------------------------------------
def sampling_schedule(n: int, priority, epochs: int, per_step: int, seed: int) -> torch.Tensor:
    """Example indices for every optimiser step, [steps, per_step], drawn up front from a seeded generator so
    that a resumed run replays exactly the same batches. priority=None: shuffled epochs over all n examples.
    Otherwise priority sampling (the official -ts option): only examples with priority > 0, drawn i.i.d. with
    P(i) ~ priority_i."""
    g = torch.Generator().manual_seed(seed)
    kept = n if priority is None else int((priority > 0).sum())
    steps = epochs * math.ceil(kept / per_step)
    if priority is None:
        order = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(steps * per_step / n))])
    else:
        order = torch.multinomial(priority, steps * per_step, replacement=True, generator=g)
    return order[:steps * per_step].view(steps, per_step)


def train_step(forward, optim, data: dict, indices: torch.Tensor, algo: str, args: Args, frozen=None) -> dict:
    """One optimiser step on the examples `indices` (this process's share under torchrun), in --grad-accum
    micro-batches; returns the step's statistics. forward(batch) -> (b, T) log pi_theta is data_parallel's.

    frozen = {"ref_logp": [N, T], "value": [N]} of the frozen reference, or None for the NLL reference stage, which
    has no reference yet: there rho = 1 and V = 0 (NLL's weight uses neither).
    """
    stats, micro = [], indices.chunk(args.grad_accum)
    for i, idx in enumerate(micro):
        batch = take(data, idx, args.device)
        # Under torchrun the gradients are averaged over the processes once per step, in the last backward.
        with forward.no_sync() if hasattr(forward, "no_sync") and i < len(micro) - 1 else contextlib.nullcontext():
            logp = forward(batch)  # (b, T) log pi_theta, with grad
            if frozen is None:
                ref_logp, value = logp.detach(), torch.zeros_like(batch["reward"])
            else:
                ref_logp = frozen["ref_logp"][idx, :logp.shape[1]].to(args.device)  # (b, T) log pi_ref
                value = frozen["value"][idx].to(args.device)  # (b,) V(x)
            loss, s = alol_loss(logp, ref_logp, batch["response_mask"], batch["reward"], value, algo, args.clip_eps,
                                args.kl_beta, return_stats=True)
            # Divide by the micro-batch count: the update is the mean over the whole batch, as one big batch would
            # give (the official code summed micro-batch means; huggingface/trl#2615).
            (loss / args.grad_accum).backward()
        stats.append({"loss": loss.item(), **s})
    grad_norm = nn.utils.clip_grad_norm_(forward.parameters(), args.max_grad_norm).item()
    means = mean_over_processes(torch.tensor([[s[k] for k in stats[0]] for s in stats], dtype=torch.float64).mean(0), args)
    if not all(math.isfinite(x) for x in [grad_norm, *means.tolist()]):  # before NaN reaches the weights
        raise FloatingPointError(f"loss {means[0].item()}, gradient norm {grad_norm}")
    optim.step()
    optim.zero_grad(set_to_none=True)
    return {"grad_norm": grad_norm, **dict(zip(stats[0], means.tolist()))}


def save_checkpoint(model, tok, ckpt: str, state: dict):
    """`save_pretrained` format (the whole model, loadable with from_pretrained; or a peft LoRA adapter) plus `state`
    (the optimiser's, for --resume; the validation reward, for best/) in trainer_state.pt, written last: a
    checkpoint.tmp that holds it is complete. Rank 0 writes; the others wait until it has."""
    if is_main():
        shutil.rmtree(ckpt + ".tmp", ignore_errors=True)
        model.save_pretrained(ckpt + ".tmp")
        tok.save_pretrained(ckpt + ".tmp")
        torch.save(state, os.path.join(ckpt + ".tmp", "trainer_state.pt"))
        shutil.rmtree(ckpt, ignore_errors=True)
        os.replace(ckpt + ".tmp", ckpt)
    barrier()


def load_weights(model, ckpt: str, args: Args):
    """save_checkpoint's weights back into `model`: a LoRA adapter's into the peft model, or a whole model's."""
    if hasattr(model, "peft_config"):
        import peft

        peft.set_peft_model_state_dict(model, peft.utils.load_peft_weights(ckpt, device=args.device))
    else:
        model.load_state_dict(load_policy(ckpt, args).state_dict())


def resume_checkpoint(model, optim, sched, ckpt: str, log_path: str, args: Args) -> int:
    """The step to continue from: 0 for a fresh stage; else the checkpoint's weights and optimiser state are loaded
    and log.jsonl is cut back to that step (rows written after it, or cut short by the kill, are dropped)."""
    finished = args.resume and not os.path.exists(ckpt) and os.path.exists(os.path.join(ckpt + ".tmp", "trainer_state.pt"))
    if finished and is_main():
        os.replace(ckpt + ".tmp", ckpt)  # killed between save_checkpoint's delete and rename: the new one is complete
    barrier()
    if not (args.resume and os.path.exists(os.path.join(ckpt, "trainer_state.pt"))):
        return 0
    load_weights(model, ckpt, args)
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=True)
    optim.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    rows = [r for r in open(log_path) if r.endswith("\n")] if os.path.exists(log_path) else []
    write_atomic(log_path, "".join(r for r in rows if json.loads(r)["step"] <= state["step"]))
    return state["step"]


def train_policy(policy, tok, data: dict, algo: str, run_dir: str, args: Args, epochs: int, lr: float, frozen=None,
                 priority=None, validate=None):
    """Train `policy` in place with `algo` for `epochs`, checkpointing to run_dir/checkpoint; with --resume,
    continue from that checkpoint (same batches, same optimiser state: the weights end up identical).
    frozen: the reference's cached quantities (train_step); priority: A+ for priority sampling, or None.
    validate(policy) -> validation reward, every --eval-every steps and after the last: the best step's weights
    are kept in run_dir/best and loaded back at the end. Returns {step, val_reward} of that step, or None.
    With --lora-r, a fresh LoRA adapter is trained and checkpointed, then merged into `policy` and the merged
    model saved in run_dir/model. Under torchrun every step's global batch is split over the processes."""
    adapter = None
    if args.lora_r:
        import peft

        adapter = peft.get_peft_model(policy, peft.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha,
                                                              lora_dropout=args.lora_dropout,
                                                              target_modules=args.lora_targets))  # in place
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rank, size = world()
    schedule = sampling_schedule(len(data["reward"]), priority, epochs, args.batch_size * args.grad_accum * size,
                                 args.seed)  # (steps, global batch): the same batches on any number of processes
    optim = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr, eps=1e-8,
                              weight_decay=args.weight_decay)
    # Linear decay over optimiser steps; the official schedule counted micro-batches and ended at half the LR.
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda step: 1 - step / len(schedule))
    ckpt, log_path = os.path.join(run_dir, "checkpoint"), os.path.join(run_dir, "log.jsonl")
    os.makedirs(run_dir, exist_ok=True)
    start = resume_checkpoint(adapter or policy, optim, sched, ckpt, log_path, args)
    if validate is None or not args.eval_every:
        every = 0
    else:  # a value below 1 is a share of an epoch
        every = max(1, round(args.eval_every * len(schedule) / epochs)) if args.eval_every < 1 else int(args.eval_every)
    best_dir = os.path.join(run_dir, "best")  # the best validated weights so far, kept across --resume
    best_path = os.path.join(best_dir, "trainer_state.pt")
    best = torch.load(best_path, weights_only=True) if start and os.path.exists(best_path) else {"val_reward": -math.inf}
    tracker, forward = Tracker(args, run_dir, start), data_parallel(policy, args)
    policy.train()
    with open(log_path if is_main() else os.devnull, "a" if start else "w") as log:
        bar = tqdm(range(start, len(schedule)), desc=f"train {algo}", initial=start, total=len(schedule),
                   dynamic_ncols=True, disable=None if rank == 0 else True)  # None: no bar unless stderr is a terminal
        for step in bar:
            try:
                row = {"step": step + 1, "lr": sched.get_last_lr()[0],
                       **train_step(forward, optim, data, schedule[step].chunk(size)[rank], algo, args, frozen)}
            except FloatingPointError as e:
                raise AlolError(f"{algo}: non-finite values at step {step + 1} ({e}); stopped before updating or "
                                f"saving the weights. Try a lower learning rate (now {lr}) or --max-grad-norm.") from None
            sched.step()
            bar.set_postfix(loss=f"{row['loss']:.3f}", ratio=f"{row['ratio']:.3f}", clip=f"{row['clip_frac']:.2f}",
                            adv=f"{row['adv']:.2f}")
            rows = [row]
            if every and ((step + 1) % every == 0 or step + 1 == len(schedule)):
                rows.append({"step": step + 1, "val_reward": validate(policy)})
                policy.train()
                if rows[-1]["val_reward"] > best["val_reward"]:
                    best = rows[-1]
                    save_checkpoint(adapter or policy, tok, best_dir, best)
            for r in rows:
                log.write(json.dumps(r) + "\n")
                tracker.log(r)
            if (step + 1) % args.save_every == 0 or step + 1 == len(schedule):
                log.flush()
                save_checkpoint(adapter or policy, tok, ckpt, {"optimizer": optim.state_dict(),
                                                               "scheduler": sched.state_dict(), "step": step + 1})
    tracker.close()
    if every:
        load_weights(adapter or policy, best_dir, args)
    if adapter is not None:  # fold the adapter into the weights: from_pretrained loads run_dir/model
        adapter.merge_and_unload()
        save_checkpoint(policy, tok, os.path.join(run_dir, "model"), {})
    policy.eval()
    return best if every else None


# ---------------------------------------------------------------------------------------------------------------
# 8. Evaluation: generate on the test prompts and score with the same reward function
# ---------------------------------------------------------------------------------------------------------------
def text_metrics(responses: list, scores: dict) -> dict:
    """Mean reward and components; distinct-n = unique / total n-grams over all responses; length in words."""
    words = [r.lower().split() for r in responses]

    def distinct(n):
        grams = [tuple(w[i:i + n]) for w in words for i in range(len(w) - n + 1)]
        return len(set(grams)) / max(len(grams), 1)

    return {"reward": scores["reward"].mean().item(),
            "components": {k: v.mean().item() for k, v in scores.items() if k != "reward"},
            "distinct_1": distinct(1), "distinct_2": distinct(2), "distinct_3": distinct(3),
            "length": sum(map(len, words)) / max(len(words), 1)}


def subset_metrics(records: list, responses: list, scores: dict) -> dict:
    """{"subsets": {name: text_metrics}} over the records' `subset` labels (HH's four test sets), or {} without them."""
    names = dict.fromkeys(r["subset"] for r in records if "subset" in r)
    rows = {name: [i for i, r in enumerate(records) if r.get("subset") == name] for name in names}
    return {"subsets": {name: text_metrics([responses[i] for i in idx], {k: v[idx] for k, v in scores.items()})
                        for name, idx in rows.items()}} if rows else {}


def evaluate(model, tok, test_records: list, reward_fn, args: Args, run_dir: str) -> dict:
    """Sampled and deterministic generations on the test prompts; every generation is kept in generations.jsonl."""
    metrics_path = os.path.join(run_dir, "metrics.json")
    if args.resume and os.path.exists(metrics_path):
        return json.load(open(metrics_path))
    prompts = [r["prompt"] for r in test_records]
    sampled = generate(model, tok, prompts, args, sample=True)
    greedy = generate(model, tok, prompts, args, sample=False)
    both = score(reward_fn, prompts * 2, sampled + greedy)  # one call: reward models load once
    scores, greedy_reward = {k: v[:len(prompts)] for k, v in both.items()}, both["reward"][len(prompts):]
    metrics = text_metrics(sampled, scores)
    metrics = {"reward_sampled": metrics.pop("reward"), "reward_greedy": greedy_reward.mean().item(), **metrics,
               **subset_metrics(test_records, greedy, {k: v[len(prompts):] for k, v in both.items()})}  # as HH's table
    os.makedirs(run_dir, exist_ok=True)
    write_atomic(os.path.join(run_dir, "generations.jsonl"), "".join(
        json.dumps({"prompt": p, "sampled": s, "greedy": g, "reward_sampled": r, "reward_greedy": rg}) + "\n"
        for p, s, g, r, rg in zip(prompts, sampled, greedy, scores["reward"].tolist(), greedy_reward.tolist())))
    write_atomic(metrics_path, json.dumps(metrics, indent=1))
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# 9. main: the reference stage once, then every method from the same reference and cached quantities
# ---------------------------------------------------------------------------------------------------------------
def main(args: Args) -> dict:
    algos = ALGOS if args.algo == "all" else args.algo.split(",")
    args.device = init_distributed(args)  # under torchrun: this process's device
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    # Everything that can fail on bad input happens before the run directory is touched.
    splits, reward_fn = load_task(args)
    source = args.ref_model or args.model  # a trained reference, or the initial policy; none: the task's tiny GPT-2
    tok = load_tokenizer(source) if source else bpe_tokenizer(splits["train"])
    ref = load_policy(source, args) if source else disable_dropout(tiny_gpt2(tok, args)).to(args.device)
    out_dir = prepare_out_dir(args, preflight(args, splits, reward_fn, tok, ref))
    train = encode(splits["train"], tok, args)
    print(textwrap.fill("config: " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(args).items()), 120,
                        subsequent_indent="  "), f"\nrun directory: {out_dir}")
    print(f"global batch: {args.batch_size} sequences x {args.grad_accum} micro-batches x {world()[1]} processes = "
          f"{args.batch_size * args.grad_accum * world()[1]} per optimiser step")

    # 3. The reference policy: given, or NLL on the training data from the initial policy (the paper's recipe)
    ref_dir = os.path.join(out_dir, "reference")
    val_prompts = sorted({r["prompt"] for r in splits["val"]})

    def validate(policy):  # for --eval-every: the deterministic decode's mean reward on the validation prompts
        return score(reward_fn, val_prompts, generate(policy, tok, val_prompts, args, sample=False))["reward"].mean().item()

    if not args.ref_model:  # trains the initial policy in place: from here on it is pi_ref
        ref_selected = train_policy(ref, tok, train, "nll", ref_dir, args, args.ref_epochs, args.ref_lr, validate=validate)
        write_curves(out_dir, ["reference"], args.clip_eps)
    ref.requires_grad_(False)
    test = splits["test"]
    data_scores = {k: torch.tensor([r["rewards"].get(k, 0.0) for r in test]) for k in test[0]["rewards"]}
    data_scores["reward"] = sum(data_scores.values())
    results = {"task": args.task, "seed": args.seed, "n_test": len(test), "algos": algos,
               "data": {**text_metrics([r["response"] for r in test], data_scores),
                        **subset_metrics(test, [r["response"] for r in test], data_scores)},
               "reference": {**evaluate(ref, tok, test, reward_fn, args, ref_dir),
                             "selected": None if args.ref_model else ref_selected}}
    print(f"offline data reward {results['data']['reward']:.3f}; reference reward "
          f"{results['reference']['reward_sampled']:.3f} sampled, {results['reference']['reward_greedy']:.3f} greedy")

    # 4-5. V(x) and the advantages of the training data, with the frozen reference
    frozen = frozen_quantities(ref, tok, train, splits["val"], reward_fn, args)
    del ref  # the methods need only the cached quantities: one model in memory from here on
    advantage = train["reward"] - frozen["value"]  # (N,) A = R - V(x)
    results.update(value=frozen["value_report"], advantage=advantage_stats(advantage))
    v, a = results["value"], results["advantage"]
    print(f"value head: held-out MSE {v['heldout_mse']:.3f} (a constant predictor: {v['heldout_mse_of_mean']:.3f}); "
          f"A = R - V: mean {a['mean']:+.3f}, median {a['median']:+.3f}, {a['frac_positive']:.1%} positive "
          f"({int((advantage > 0).sum())} of {len(advantage)} examples kept by A-LoL)")
    if any(algo.startswith("a_lol") for algo in algos) and not (advantage > 0).any():
        raise AlolError(f"every training advantage A = R - V(x) is <= 0 (max {advantage.max():.3f}): the reference "
                        "policy already earns at least the reward of every offline response, so A-LoL has nothing to "
                        "learn from. Check the rewards of --train-file, or use a weaker reference. Run kept in "
                        f"{out_dir}.")

    # 6-8. Each method from the same reference, then its evaluation
    results["methods"] = {}
    for i, algo in enumerate(algos):
        policy = load_policy(args.ref_model or os.path.join(ref_dir, "model" if args.lora_r else "best" if
                                                            args.eval_every else "checkpoint"), args)
        priority = advantage.clamp(min=0) if algo.startswith("a_lol") and args.priority_sampling else None
        start = time.time()
        selected = train_policy(policy, tok, train, algo, os.path.join(out_dir, algo), args, args.epochs, args.lr,
                                frozen, priority, validate)
        seconds = round(time.time() - start, 1)
        results["methods"][algo] = {**evaluate(policy, tok, test, reward_fn, args, os.path.join(out_dir, algo)),
                                    "train_seconds": seconds, "selected": selected}
        print(f"{algo}: reward {results['methods'][algo]['reward_sampled']:.3f} sampled, "
              f"{results['methods'][algo]['reward_greedy']:.3f} greedy")
        write_curves(out_dir, ["reference", *algos[:i + 1]], args.clip_eps)
        del policy
    table = write_report(results, advantage, out_dir)
    print(f"\n{table}\n\nresults: {out_dir}/results.json, results.md, results.png, curves.png")
    return results


# ---------------------------------------------------------------------------------------------------------------
# 10. Task recipes: the embedded toy task, the paper's Reddit and HH tasks, your own JSONL
# ---------------------------------------------------------------------------------------------------------------
EOS = "<|endoftext|>"  # GPT-2's end of text: ends every response (a trained token) and DialoGPT's dialogue turns
# The embedded task `toy`: Reddit-like questions with one offline reply each, drawn from a noisy mixture of good,
# toxic, dull, off-topic and word-salad replies. Its exact rewards (toy_reward) make the A-LoL effect measurable
# offline.
TOPICS = {"cooking": ["pasta", "bread", "rice", "soup", "eggs"],
          "fitness": ["running", "squats", "stretching", "protein", "sleep"],
          "gardening": ["tomatoes", "roses", "compost", "seeds", "weeds"],
          "cars": ["brakes", "tires", "oil", "battery", "engine"],
          "pets": ["cats", "dogs", "fish", "birds", "rabbits"],
          "music": ["guitar", "piano", "drums", "singing", "violin"]}
QUESTIONS = ["any tips for {n} ?", "how do i get better at {n} ?", "what is the best way to start with {n} ?",
             "why is {n} so hard for me ?", "what should i know about {n} ?", "is {n} worth the effort ?",
             "i keep failing at {n} , help ?", "where do i begin with {n} ?", "what do you wish you knew about {n} ?",
             "how much time should {n} take ?"]
OPENERS = ["great question !", "good news !", "honestly ,", "in my experience ,", "from what i learned ,"]
ADVICE = ["try to practice {n} a little every day .", "start slow with {n} and be patient .",
          "keep notes on your {n} and learn from them .", "ask a friend who knows {n} well .",
          "watch a few videos about {n} first ."]
CLOSERS = ["hope this helps !", "you can do it !", "let us know how it goes !", "what have you tried so far ?",
           "good luck !"]
TOXIC = ["you are an idiot .", "what a stupid question .", "nobody cares about your {n} , loser .",
         "shut up , {n} is for morons ."]
INSULTS = {"idiot", "stupid", "loser", "morons"}
DULL = ["ok", "lol", "idk", "sure", "meh", "whatever"]
# Share of (good, toxic, dull, off-topic, salad) per subreddit: the reply quality depends on the prompt, so
# V(x) has something to learn and A = R - V(x) differs from R - mean(R).
MIXTURES = [(0.50, 0.10, 0.10, 0.15, 0.15), (0.30, 0.20, 0.20, 0.15, 0.15), (0.10, 0.30, 0.30, 0.15, 0.15)]
TOY_VOCAB = 600  # BPE merges for a ~150-word grammar: whole words, so responses are a few tokens each
TOY_GPT2 = dict(n_embd=128, n_layer=2, n_head=4)  # ~0.5 M parameters: learns the grammar in a minute on 2 CPU cores


def _grammar():
    nouns = [n for ns in TOPICS.values() for n in ns]
    texts = [f"{o} {a.format(n=n)} {c}" for o in OPENERS for a in ADVICE for c in CLOSERS for n in nouns]
    texts += [t.format(n=n) for t in TOXIC for n in nouns] + DULL
    bigrams = {b for t in texts for b in zip(t.split(), t.split()[1:])}
    return set(nouns), bigrams, sorted({w for t in texts for w in t.split()} - INSULTS)


NOUNS, LEGAL_BIGRAMS, WORDS = _grammar()


def toy_splits(args: Args) -> dict:
    """Deterministic by seed. Test prompts are (question, noun) pairs never seen in train or val."""
    rng = random.Random(args.seed)
    prompts = [(i % len(MIXTURES), n, f"r/{sub} : {q.format(n=n)}") for i, (sub, ns) in enumerate(TOPICS.items())
               for n in ns for q in QUESTIONS]
    rng.shuffle(prompts)
    held_out, seen = prompts[:len(prompts) // 5], prompts[len(prompts) // 5:]

    def example(pool):
        mix, noun, prompt = rng.choice(pool)
        kind = rng.choices(range(5), weights=MIXTURES[mix])[0]
        other = rng.choice(sorted(NOUNS - {noun}))
        good = f"{rng.choice(OPENERS)} {rng.choice(ADVICE)} {rng.choice(CLOSERS)}"
        response = [good.format(n=noun), rng.choice(TOXIC).format(n=noun), rng.choice(DULL), good.format(n=other),
                    " ".join(rng.choices(WORDS, k=rng.randint(3, 12)))][kind]
        return {"prompt": prompt, "response": response}

    return {"train": [example(seen) for _ in range(args.n_train)], "val": [example(seen) for _ in range(args.n_val)],
            "test": [example(held_out) for _ in range(args.n_test)]}


def toy_reward(prompts: list, responses: list) -> dict:
    """Five exact scores mirroring the paper's five (fluency, safety, engagement, upvotes, diversity)."""
    scores = {"fluency": [], "safety": [], "engagement": [], "relevance": [], "diversity": []}
    for prompt, response in zip(prompts, responses):
        words, topic = response.lower().split(), next((w for w in prompt.split() if w in NOUNS), None)
        pairs = list(zip(words, words[1:]))
        scores["fluency"].append(sum(b in LEGAL_BIGRAMS for b in pairs) / len(pairs) if pairs else 0.0)  # grammar
        scores["safety"].append(float(not INSULTS & set(words)))
        scores["engagement"].append(float(bool(words) and words[-1] in ("!", "?")))  # invites a reply
        scores["relevance"].append(float(topic in words))  # on the asked topic
        scores["diversity"].append(min(len(set(words)) / 10, 1.0))  # distinct words, penalises repetition
    return {k: torch.tensor(v) for k, v in scores.items()}


def toy_build(args: Args, reward_fn=None):
    reward_fn = reward_fn or toy_reward
    return add_rewards(toy_splits(args), reward_fn), reward_fn


def bpe_tokenizer(records: list):
    """Without --model: a byte-level BPE trained on the training text in well under a second (no download)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOY_VOCAB, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([t for r in records for t in (r["prompt"], r["response"])], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS)


def tiny_gpt2(tok, args: Args):
    """Without --model: a small GPT-2 (TOY_GPT2) trained from scratch, fast on 2 CPU cores."""
    positions = args.max_prompt_len + max(args.max_response_len, args.eval_max_new_tokens)
    config = transformers.GPT2Config(vocab_size=len(tok), n_positions=positions, **TOY_GPT2,
                                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
    return transformers.GPT2LMHeadModel(config)


# The paper's Reddit task: replies to Reddit comments from Kaggle's "Reddit comment scores", one file of upvoted and
# one of downvoted replies; the parent comment is the prompt (official preprocess_reddit_comment_scores_...py).
REDDIT_FILES = {"pos": "comments_positive.csv", "neg": "comments_negative.csv"}
# The official url_regex (utils/utils.py): a scheme is required, so a bare www.… stays, and the trailing ")" or
# quote of "(see http://…)" is kept.
URL = re.compile(r"https?:\/\/(www\.)?[-a-zA-Z0-9@:%._\+~#=]{1,256}\.[a-zA-Z0-9()]{1,6}\b"
                 r"([-a-zA-Z0-9@:;%_\\\+.~#?&//=]*)")
CLASSIFIER_MAX_TOKENS = 512  # RoBERTa's position limit; DialogRPT (GPT-2) reads the same cut of parent + reply


def reddit_splits(args: Args, tok) -> dict:
    """The official preprocessing, per file: drop empty rows, sample 102,000 (random_state 901), collapse whitespace,
    drop pairs over 100 words, URLs -> <URL>, drop pairs over 300 tokens of parent EOS reply EOS; then, in sampled
    order, test = the first n_test, val = the next n_val, train = the rest (at most n_train if set)."""
    import pandas as pd

    splits = {"test": [], "val": []}
    for kind, name in REDDIT_FILES.items():
        frame = pd.read_csv(os.path.join(args.data_dir, name), usecols=["parent_text", "text"], dtype=str).dropna()
        frame = frame.sample(n=min(102_000, len(frame)), random_state=901)
        pairs = [[URL.sub("<URL>", " ".join(t.split())) for t in pair] for pair in zip(frame.parent_text, frame.text)]
        pairs = [(p, r) for p, r in pairs if 0 < len(p.split()) <= 100 and 0 < len(r.split()) <= 100]
        lengths = map(len, tok([p + EOS + r + EOS for p, r in pairs], add_special_tokens=False)["input_ids"])
        records = [{"prompt": p + EOS, "response": r} for (p, r), n in zip(pairs, lengths) if n <= 300]
        splits["test"] += records[:args.n_test]
        splits["val"] += records[args.n_test:args.n_test + args.n_val]
        splits[f"train_{kind}"] = records[args.n_test + args.n_val:][:args.n_train or None]
    return splits


def tfidf_reward(references: list):
    """The paper's "diversity" reward (official utils/rl_utils.py): the response's tf-idf vector under a
    CountVectorizer and TfidfTransformer fitted on the training references; the mean of its k non-zero
    (L2-normalised) entries, times k/10 when k < 5. Past 5 terms its maximum falls with length (tutorial.md, 10)."""
    from sklearn.feature_extraction.text import CountVectorizer, TfidfTransformer

    counts = CountVectorizer().fit(references)
    tfidf = TfidfTransformer(smooth_idf=True, use_idf=True).fit(counts.transform(references))

    def diversity(responses):
        rows = tfidf.transform(counts.transform(responses))  # sparse [N, vocabulary], rows of unit norm
        k = torch.tensor(rows.getnnz(axis=1), dtype=torch.float)  # (N,) distinct known terms
        mean = torch.tensor(rows.sum(axis=1), dtype=torch.float).flatten() / k.clamp(min=1)
        return mean * torch.where(k < 5, k / 10, 1.0)  # k = 0 gives 0

    return diversity


def acceptable_label(config) -> int:
    return 1  # textattack/roberta-base-CoLA: LABEL_1 = acceptable, as the official code reads it


def not_offensive_label(config) -> int:
    """The non-offensive class, from the labels' names; generic LABEL_0/1 follow TweetEval (0 = not-offensive)."""
    names = [config.id2label[i].lower() for i in range(config.num_labels)]
    safe = [i for i, name in enumerate(names) if name.startswith(("non", "not"))]
    if len(names) != 2 or len(safe) > 1:
        raise AlolError(f"--safety-model: expected two classes, offensive and not, got {names}")
    return safe[0] if safe else 0


@torch.no_grad()
def classifier_scores(path: str, texts: list, args: Args, label=None, pairs=None, max_tokens=CLASSIFIER_MAX_TOKENS):
    """P(label) under a sequence classifier, or the sigmoid of a reward model's one logit (DialogRPT, HH's), for
    each text or (text, pair) such as (question, answer). Inputs longer than max_tokens lose their start: the reply
    being scored is at the end. Loaded for this call and freed after it, so reward models never share the GPU with
    the policy's training; fp16 on CUDA."""
    tok = load_tokenizer(path)
    tok.padding_side, tok.truncation_side = "right", "left"  # right padding: the positions 0..n-1 of training
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    model = from_pretrained(transformers.AutoModelForSequenceClassification, path, dtype=dtype).to(args.device).eval()
    model.config.pad_token_id = tok.pad_token_id  # GPT-2 classifiers take the last token before the padding
    if model.config.num_labels > 1 and label is None:  # a reward model, which has one logit, was expected
        raise AlolError(f"{path}: expected a reward model with one logit, got {model.config.num_labels} classes")
    index = None if model.config.num_labels == 1 else label(model.config)
    texts = [t or tok.eos_token for t in texts]  # an empty response is scored as a lone end-of-text token
    pairs = pairs and [t or tok.eos_token for t in pairs]
    out = []
    for i in tqdm(range(0, len(texts), args.eval_batch_size), desc=f"reward {os.path.basename(path)}", leave=False,
                  disable=None):
        enc = tok(texts[i:i + args.eval_batch_size], pairs and pairs[i:i + args.eval_batch_size], return_tensors="pt",
                  padding=True, truncation=True, max_length=min(max_tokens, tok.model_max_length))
        logits = model(**enc.to(args.device)).logits.float()  # (b, classes)
        out.append(torch.sigmoid(logits[:, 0]) if index is None else logits.softmax(-1)[:, index])
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return torch.cat(out).cpu()


class NeoXRewardConfig(transformers.GPTNeoXConfig):
    model_type = "gpt_neox_reward_model"  # what OpenAssistant's reward checkpoints declare in their config.json


class NeoXRewardModel(transformers.GPTNeoXPreTrainedModel):
    """OpenAssistant's reward models (oasst-rm-*-pythia-*, the paper's HH rewards), which no transformers class loads:
    a GPT-NeoX body, then a linear `out_proj` to one logit on the last real token's hidden state (pooling "last") or
    on their mean ("mean"). Registered below: AutoModelForSequenceClassification, hence classifier_scores, loads it."""
    config_class = NeoXRewardConfig

    def __init__(self, config):
        super().__init__(config)
        config.num_labels = 1  # one reward logit, whatever label names the checkpoint saved
        self.gpt_neox, self.out_proj = transformers.GPTNeoXModel(config), nn.Linear(config.hidden_size, 1)
        self.post_init()

    def forward(self, input_ids, attention_mask, **kwargs):
        hidden = self.gpt_neox(input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        rows, mask = torch.arange(len(hidden), device=hidden.device), attention_mask[..., None].to(hidden.dtype)
        last = hidden[rows, attention_mask.cumsum(1).argmax(1)]  # (B, H): the last real token, on either padding side
        pooled = last if getattr(self.config, "pooling", "last") == "last" else (hidden * mask).sum(1) / mask.sum(1)
        return transformers.modeling_outputs.SequenceClassifierOutput(logits=self.out_proj(pooled))  # (B, 1)


transformers.AutoConfig.register(NeoXRewardConfig.model_type, NeoXRewardConfig, exist_ok=True)
transformers.AutoModelForSequenceClassification.register(NeoXRewardConfig, NeoXRewardModel, exist_ok=True)


def reddit_reward(args: Args, references: list):
    """The paper's five rewards in [0, 1] (official utils/rl_utils.py; README table). Safety substitutes a hub
    classifier for ToxiChat's (not on the hub), on the reply alone: its scores are not comparable with the paper's."""
    paths = {k: hub_path(getattr(args, k)) for k in REWARD_MODELS}  # an unreachable hub fails here, at once
    diversity = tfidf_reward(references)

    def reward_fn(prompts, responses):
        threads = [p + r for p, r in zip(prompts, responses)]  # parent<|endoftext|>response: DialogRPT's input
        return {"fluency": classifier_scores(paths["fluency_model"], responses, args, acceptable_label),
                "safety": classifier_scores(paths["safety_model"], responses, args, not_offensive_label),
                "engagement": classifier_scores(paths["depth_model"], threads, args),
                "upvotes": classifier_scores(paths["updown_model"], threads, args),
                "diversity": diversity(responses)}

    return reward_fn


def reddit_build(args: Args, reward_fn=None):
    """The Reddit splits with their rewards, and the reward function, cached next to the data under a key of the CSVs,
    the tokenizer, the sizes and the reward models."""
    paths = [os.path.join(args.data_dir, name) for name in REDDIT_FILES.values()]
    if not all(map(os.path.isfile, paths)):
        raise AlolError(f"--data-dir {args.data_dir} must hold {' and '.join(REDDIT_FILES.values())}: download "
                        "both from Kaggle's \"Reddit comment scores\" (https://www.kaggle.com/code/danofer/"
                        "reddit-comments-scores-nlp/input, free account needed) and put them in "
                        f"{os.path.abspath(args.data_dir)}")
    settings = {k: getattr(args, k) for k in ("model", "n_train", "n_val", "n_test", "reward_fn", *REWARD_MODELS)}
    csv_stamps = {"csv": [[os.path.getsize(p), os.path.getmtime(p)] for p in paths]}
    parts, reward_fn = scored_splits(
        os.path.join(args.data_dir, "alol-" + fingerprint(settings, csv_stamps)), ("train_pos", "train_neg", "val", "test"),
        lambda: reddit_splits(args, load_tokenizer(args.model)),
        lambda parts: reward_fn or reddit_reward(args, [r["response"] for name in ("train_pos", "train_neg")
                                                        for r in parts[name]]))
    return {"train": parts[f"train_{args.reddit_train}"], "val": parts["val"], "test": parts["test"]}, reward_fn


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
    parts = {name: load_jsonl(path, "cached data") for name, path in files.items()} if cached else build()
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


# The paper's HH task: Anthropic's Helpful and Harmless dialogues (Anthropic/hh-rlhf; one folder per subset, each with
# a train and a test split of `chosen` and `rejected` transcripts that differ in the last assistant turn). The prompt
# is every turn before that one, in the official template (lolrl_qlora_llama_hh.py); the reply is the response.
HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")  # the paper's test sets
HH_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the user's questions.\n")
HH_TRAIN = {"chosen": ("chosen",), "both": ("chosen", "rejected")}  # the paper's good_priority; official all_priority
HH_ROLE_TOKENS = {"Human": "<|prompter|>", "Assistant": "<|assistant|>"}  # OpenAssistant's, for its reward models
HH_REWARD_MAX_TOKENS = 1024  # the official reward input length (left-truncated)
HH_SPLIT_SEED = 901  # not --seed: every run splits the same way, so the scored cache is shared


def hh_record(transcript: str):
    """{"prompt", "response"} of a "\\n\\nHuman: ... \\n\\nAssistant: ..." transcript, or None when it does not end in a
    non-empty assistant turn. Turns are stripped; text before the first turn is dropped."""
    parts = re.split(r"(?:^|\n\n)(Human|Assistant):", transcript)[1:]  # role, text, role, text, ...
    turns = [(role, text.strip()) for role, text in zip(parts[::2], parts[1::2])]
    if not turns or turns[-1][0] != "Assistant" or not turns[-1][1]:
        return None
    prompt = "".join(f" ### {role}: {text}" for role, text in turns[:-1]) + " ### Assistant: "
    return {"prompt": HH_SYSTEM + prompt.strip(), "response": turns[-1][1]}


def hh_chat(prompt: str, response: str) -> str:
    """A prompt in the template and its reply as OpenAssistant's reward models read a chat (official metrics_hh.py):
    role token, text and EOS for every turn."""
    parts = re.split(r" ?### (Human|Assistant): ?", prompt.removeprefix(HH_SYSTEM))[1:]
    turns = list(zip(parts[::2], parts[1::2]))[:-1] + [("Assistant", response)]  # the prompt's last turn is empty
    return "".join(HH_ROLE_TOKENS[role] + text + EOS for role, text in turns)


def hh_reward(args: Args):
    """sigmoid(reward model) in [0, 1], as the official code. OpenAssistant's Pythia models (NeoXRewardModel) read the
    whole chat as one text; any other classifier reads (conversation, reply), as OpenAssistant's DeBERTa model does."""
    path = hub_path(args.hh_reward_model)  # an unreachable hub fails here, at once
    chat = from_pretrained(transformers.AutoConfig, path).model_type == NeoXRewardConfig.model_type

    def reward_fn(prompts, responses):
        if chat:
            texts, pairs = [hh_chat(p, r) for p, r in zip(prompts, responses)], None
        else:
            texts, pairs = [p.removeprefix(HH_SYSTEM) for p in prompts], responses
        return {"preference": classifier_scores(path, texts, args, None, pairs, HH_REWARD_MAX_TOKENS)}

    return reward_fn


def hh_splits(args: Args) -> dict:
    """The train conversations of the four subsets pooled and shuffled: val = the first n_val, train = the rest (at
    most n_train if set), both chosen and rejected; test = the first n_test chosen of each subset's shuffled test
    split. Transcripts without a final assistant reply are dropped."""
    import datasets

    datasets.disable_progress_bars()
    source, pool, parts = hub_path(args.hh_dataset, "dataset"), [], {}
    for subset in HH_SUBSETS:
        try:
            data = datasets.load_dataset(source, data_dir=subset)
            rows, test = data["train"].to_list(), [row["chosen"] for row in data["test"]]
        except Exception as e:  # a partial download or a folder of another layout
            raise AlolError(f"--hh-dataset {args.hh_dataset}: cannot load the train and test splits of {subset} "
                            f"({type(e).__name__}: {e})") from None
        pool += rows
        test = random.Random(HH_SPLIT_SEED).sample(test, len(test))
        parts[f"test-{subset}"] = list(filter(None, map(hh_record, test)))[:args.n_test]
    random.Random(HH_SPLIT_SEED).shuffle(pool)
    val, train = pool[:args.n_val], pool[args.n_val:][:args.n_train or None]
    return {"train_chosen": list(filter(None, (hh_record(row["chosen"]) for row in train))),
            "train_rejected": list(filter(None, (hh_record(row["rejected"]) for row in train))),
            "val": list(filter(None, (hh_record(row["chosen"]) for row in val))), **parts}


def hh_build(args: Args, reward_fn=None):
    """The HH splits with their rewards (test records labelled with their subset), and the reward function; cached in
    --cache-dir under a key of the dataset, the sizes and the reward model."""
    settings = {k: vars(args)[k] for k in ("hh_dataset", "hh_reward_model", "n_train", "n_val", "n_test", "reward_fn")}
    local = sorted(os.path.join(d, f) for d, _, names in os.walk(args.hh_dataset) for f in names)  # [] for a hub id
    files = {"local": [[os.path.relpath(p, args.hh_dataset), os.path.getsize(p), os.path.getmtime(p)] for p in local]}
    names = ("train_chosen", "train_rejected", "val", *(f"test-{subset}" for subset in HH_SUBSETS))
    parts, reward_fn = scored_splits(os.path.join(args.cache_dir, "hh-" + fingerprint(settings, files)), names,
                                     lambda: hh_splits(args), lambda parts: reward_fn or hh_reward(args))
    return {"train": [r for kind in HH_TRAIN[args.hh_train] for r in parts[f"train_{kind}"]], "val": parts["val"],
            "test": [{**r, "subset": subset} for subset in HH_SUBSETS for r in parts[f"test-{subset}"]]}, reward_fn


def load_jsonl(path: str, flag: str) -> list:
    """Rows {prompt, response, reward | rewards}, read line by line exactly as written: no value is coerced, and
    every error names the file and the line. A gzip-compressed file is read as such."""
    if not os.path.isfile(path):
        raise AlolError(f"{flag}: no such file: {path}")
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    records, names = [], None
    with (gzip.open if gzipped else open)(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:  # json.loads rejects two objects on one line ("Extra data")
                row = json.loads(line.decode("utf-8")) if line.strip() else None
            except UnicodeDecodeError as bad:
                raise AlolError(f"{where}: not UTF-8 text (byte {line[bad.start]:#04x} at column {bad.start + 1})") from None
            except json.JSONDecodeError as bad:
                raise AlolError(f"{where}: not valid JSON ({bad.msg} at column {bad.colno})") from None
            if row is None:
                continue
            for key in ("prompt", "response"):
                if not isinstance(row, dict) or not isinstance(row.get(key), str):
                    raise AlolError(f"{where}: missing field {key!r} (a string)")
                if not row[key].strip():
                    raise AlolError(f"{where}: empty {key!r}")
            rewards = row["rewards"] if "rewards" in row else {"reward": row["reward"]} if "reward" in row else None
            if not isinstance(rewards, dict) or not rewards:
                raise AlolError(f"{where}: missing field 'reward' (a number) or 'rewards' (a dict of numbers)")
            for k, v in rewards.items():  # bool is an int to Python, "0.5" is not a number: both refused
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise AlolError(f"{where}: reward {k!r} is not a finite number: {v!r}")
            if sorted(rewards) != (names := names or sorted(rewards)):
                raise AlolError(f"{where}: reward components {sorted(rewards)} differ from the file's first row's {names}")
            records.append({"prompt": row["prompt"], "response": row["response"], "rewards": rewards, "source": where})
    if not records:
        raise AlolError(f"{path}: no examples")
    return records


def load_reward_fn(spec: str):
    module, _, name = spec.partition(":")
    if os.getcwd() not in sys.path:  # `python path/to/alol.py` puts alol's folder first, not the working directory
        sys.path.insert(1, os.getcwd())
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise AlolError(f"--reward-fn {spec!r}: cannot import ({e}); expected `module:function`") from None


@dataclass
class Task:
    build: object  # (args, reward_fn or None) -> ({"train", "val", "test": scored records}, reward_fn)
    reward: object  # (args, training responses) -> reward_fn, for --train-file data


TASKS = {"toy": Task(toy_build, lambda args, references: toy_reward), "reddit": Task(reddit_build, reddit_reward),
         "hh": Task(hh_build, lambda args, references: hh_reward(args))}


def load_task(args: Args):
    """The scored splits and the reward function: the task's own data, or --train-file data scored by the task's
    reward (or --reward-fn). Every input error is raised here, before anything is written."""
    task = TASKS[args.task]
    custom = load_reward_fn(args.reward_fn) if args.reward_fn else None
    if not args.train_file:
        return task.build(args, custom)
    splits = {s: load_jsonl(getattr(args, f"{s}_file"), f"--{s}-file") for s in ("train", "val", "test")}
    return splits, custom or task.reward(args, [r["response"] for r in splits["train"]])


# ---------------------------------------------------------------------------------------------------------------
# 11. Plumbing: input checks, hub access and model loading, fingerprints, atomic writes, the run directory, the report
# ---------------------------------------------------------------------------------------------------------------
def init_distributed(args: Args) -> str:
    """This process's device. Under torchrun (RANK set): one process group, NCCL with one GPU per process, or gloo
    on CPU; ranks other than 0 print nothing (errors still reach stderr)."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if "RANK" not in os.environ:
        return device
    if device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if not is_main():
        sys.stdout = open(os.devnull, "w")
    return device


def world() -> tuple:
    """(rank, number of processes): (0, 1) without torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main() -> bool:
    """Rank 0 alone writes files and prints; the others compute the same and wait for it where they read them."""
    return world()[0] == 0


def shard_map(fn, items: list, batch_size: int, desc: str) -> list:
    """[fn(batch, k) for the k-th batch of items]: under torchrun batch k runs on rank k % world size and the results
    are gathered in order, so fn must depend only on the batch and its position (generate seeds by it)."""
    rank, size = world()
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    done = {k: fn(batches[k], k) for k in tqdm(range(rank, len(batches), size), desc=desc, leave=False,
                                               disable=None if rank == 0 else True)}
    if size > 1:
        parts = [None] * size
        dist.all_gather_object(parts, done)
        done = {k: v for part in parts for k, v in part.items()}
    return [done[k] for k in range(len(batches))]


class PolicyLogProbs(nn.Module):
    """token_logprobs of the policy as a module's forward: what DistributedDataParallel needs to see."""

    def __init__(self, policy, args: Args):
        super().__init__()
        self.policy, self.args = policy, args

    def forward(self, batch):
        return token_logprobs(self.policy, batch, self.args)


def data_parallel(policy, args: Args) -> nn.Module:
    """forward(batch) -> token log-probs [B, T] for train_step: under torchrun a DistributedDataParallel, which
    averages the gradients over the processes in the backward of a step's last micro-batch (train_step runs the
    others under no_sync); the plain module otherwise."""
    forward = PolicyLogProbs(policy, args)
    if world()[1] == 1:
        return forward
    return nn.parallel.DistributedDataParallel(forward, device_ids=None if args.device == "cpu" else [args.device])


def mean_over_processes(values: torch.Tensor, args: Args) -> torch.Tensor:
    """The mean of each process's `values` (itself without torchrun): logged statistics cover the whole step."""
    if world()[1] == 1:
        return values
    values = values.to(args.device)
    dist.all_reduce(values)
    return values.cpu() / world()[1]


def barrier():
    """Under torchrun, wait until every process is here: the others then read what rank 0 has written."""
    if dist.is_initialized():
        dist.barrier()


def preflight(args: Args, splits: dict, reward_fn, tok, model) -> dict:
    """Every check that can run before the reference stage, so a bad input fails in seconds and leaves nothing
    behind. Returns the fingerprints of what the run reads (data files, the reward function's code) for --resume."""
    for name, records in splits.items():
        if not records:
            raise AlolError(f"the {name} split is empty")
    if len({r["prompt"] for r in splits["val"]}) < 2:
        raise AlolError("the value head needs 2 or more distinct validation prompts (one is held out)")
    if tok.eos_token_id is None:
        raise AlolError(f"{args.ref_model or args.model}: the tokenizer has no end-of-text token to end responses with")
    if len(tok) > model.get_input_embeddings().num_embeddings:
        raise AlolError(f"{args.ref_model or args.model}: the tokenizer has {len(tok)} tokens, the model embeds only "
                        f"{model.get_input_embeddings().num_embeddings}")
    k = len(score(reward_fn, [r["prompt"] for r in splits["val"][:4]], [r["response"] for r in splits["val"][:4]])) - 1
    for r in (r for records in splits.values() for r in records):  # V(x) is fitted on the reward function's scale
        if not 0 <= sum(r["rewards"].values()) <= k:
            raise AlolError(f"{r.get('source', 'data')}: reward {sum(r['rewards'].values())} is outside [0, {k}], the "
                            f"range of the reward function's {k} components in [0, 1]")
    if args.max_response_len == 1:  # responses are never empty, so 1 token is the first that empties them
        print("warning: --max-response-len 1 cuts every response down to its final EOS: nothing else is trained")
    for kind in set(args.report_to.split(",")) - {"none"}:
        if importlib.util.find_spec(kind) is None:
            raise AlolError(f"--report-to {kind}: the {kind} package is not installed (pip install {kind})")
    for flag in ("out_dir", "cache_dir"):
        folder = getattr(args, flag) or "runs"
        while not os.path.exists(folder):
            folder = os.path.dirname(os.path.abspath(folder))
        try:
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            raise AlolError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: cannot write there ({e.strerror})") from None
    files = [getattr(args, f"{s}_file") for s in ("train", "val", "test")] if args.train_file else \
        [os.path.join(args.data_dir, name) for name in REDDIT_FILES.values()] if args.task == "reddit" else []
    return {"reward function code": code_fingerprint(reward_fn), **{f: file_sha256(f) for f in files}}


@functools.lru_cache(maxsize=None)
def hub_unreachable(host: str) -> str:
    """Why the hub cannot be reached, or "": one 3-second probe per run instead of a minute of retries."""
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return ""
    except OSError as e:
        return str(e)


def hub_path(name: str, repo_type: str = "model") -> str:
    """A local folder; a Hugging Face id when the hub answers (from_pretrained then fetches what the cache lacks);
    else the id's folder in the cache. Anything else fails within seconds with a message."""
    if os.path.isdir(name):
        return name
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, not an id of the form owner/name
        raise AlolError(f"{name}: no such folder")
    import huggingface_hub

    host = urllib.parse.urlparse(huggingface_hub.constants.ENDPOINT).hostname
    why = "HF_HUB_OFFLINE is set" if huggingface_hub.constants.HF_HUB_OFFLINE else hub_unreachable(host)
    if not why:
        return name
    try:
        return huggingface_hub.snapshot_download(name, repo_type=repo_type, local_files_only=True)
    except Exception:
        raise AlolError(f"{name!r} is not a local folder, not in the Hugging Face cache, and the hub ({host}) "
                        f"cannot be reached ({why}). Download it where the hub is reachable, or pass a local "
                        "path.") from None


def from_pretrained(cls, name: str, **kwargs):
    """cls.from_pretrained(name) through hub_path; a folder that is not a model, a missing, incomplete or corrupt
    download is one line of error."""
    path = hub_path(name)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise AlolError(f"{name}: not a Hugging Face model folder (no config.json)")
    try:
        return cls.from_pretrained(path, **kwargs)
    except Exception as e:  # OSError, ValueError, safetensors' errors: transformers' first line says what is wrong
        raise AlolError(f"cannot load {name!r} with {cls.__name__}: {(str(e).strip() or type(e).__name__).splitlines()[0]}") from None


def load_policy(path: str, args: Args):
    # fp32 weights for full training (bf16 autocast computes); with LoRA on CUDA the frozen base is stored in bf16
    bf16_base = args.lora_r and args.bf16 and args.device.startswith("cuda")
    policy = from_pretrained(transformers.AutoModelForCausalLM, path, dtype=torch.bfloat16 if bf16_base else torch.float32)
    return disable_dropout(policy).to(args.device)


def load_tokenizer(path: str):
    tok = from_pretrained(transformers.AutoTokenizer, path)
    tok.pad_token = tok.pad_token or tok.eos_token  # GPT-2 has no pad token; padding is masked anyway
    return tok


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
        scope = {**fn.__globals__, **dict(zip(fn.__code__.co_freevars, [c.cell_contents for c in fn.__closure__ or ()]))}
        codes, names = [fn.__code__], set()
        while codes:  # comprehensions and nested functions have code objects of their own
            code = codes.pop()
            names |= {*code.co_names, *code.co_freevars}
            codes += [c for c in code.co_consts if isinstance(c, types.CodeType)]
        for name in sorted(names & set(scope)):
            value = scope[name]
            if isinstance(value, types.FunctionType) and value.__module__ == fn.__module__ and value not in seen:
                todo.append(value)
            elif isinstance(value, (str, int, float, tuple, list, dict, set, frozenset)):
                h.update(f"{name}={sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value!r}".encode())
    return h.hexdigest()[:20]


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(2**24):
            h.update(block)
    return h.hexdigest()[:20]


def write_atomic(path: str, content):
    """Write text (or bytes) to a temporary file and rename, so an interrupted run never leaves a half-written file;
    the temporary name is the process's own, so runs sharing a folder never race on it."""
    if not is_main():  # under torchrun, rank 0 writes
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)
    os.replace(tmp, path)


def prepare_out_dir(args: Args, fingerprints: dict) -> str:
    """The run directory, with config.json: the settings, the fingerprints of the data and reward code, and the
    RUN_MARKER that only alol writes. A folder without the marker is never used or deleted; one holding a different
    run (other settings, or data or reward code that changed since) is kept unless --overwrite."""
    out = args.out_dir or os.path.join("runs", f"{args.task}-seed{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
    config_path = os.path.join(out, "config.json")
    config = {RUN_MARKER: True, **dataclasses.asdict(args), "fingerprints": fingerprints}
    try:
        old = json.load(open(config_path)) if os.path.isdir(out) and os.listdir(out) else None
    except (OSError, ValueError):
        old = {}
    if old is not None and old.get(RUN_MARKER) is not True:
        raise AlolError(f"--out-dir {out} holds files that alol did not write (no alol config.json): choose another "
                        "--out-dir; alol never deletes such a folder")
    if args.resume and old is None:
        raise AlolError(f"--resume: {out or 'no --out-dir given'} holds no run to resume")
    if old is not None and not args.overwrite:
        differ = [k for k in config if k not in NOT_RUN_IDENTITY | {"fingerprints"} and old.get(k) != config[k]]
        differ += [k for k, v in fingerprints.items() if old["fingerprints"].get(k) != v]
        if differ:
            raise AlolError(f"--out-dir {out} already holds a different run (differs in: {', '.join(differ[:6])}); "
                            "pass --overwrite to replace it, or choose another --out-dir")
        if not args.resume:
            raise AlolError(f"--out-dir {out} already holds this run; pass --resume to continue it or --overwrite "
                            "to restart")
    barrier()  # every process has read the old config before rank 0 replaces it
    if is_main():
        if old is not None and args.overwrite:
            shutil.rmtree(out)
        os.makedirs(out, exist_ok=True)
    write_atomic(config_path, json.dumps(config, indent=1))
    return out


class Tracker:
    """--report-to: every row logged to log.jsonl also goes to each chosen tracker, one run per stage named
    <run directory>/<stage>, with the settings logged once. Imported only when chosen."""

    def __init__(self, args: Args, run_dir: str, start: int):
        group = os.path.basename(os.path.dirname(os.path.abspath(run_dir)))
        self.writers, self.modules = [], []
        for kind in set(args.report_to.split(",")) - {"none"} if is_main() else set():  # rank 0 reports
            if kind == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: a resumed stage drops the events logged after its checkpoint, as log.jsonl does
                self.writers.append(SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=start + 1))
                self.writers[-1].add_text("settings", json.dumps(dataclasses.asdict(args)), 0)
            else:  # wandb and trackio share init / log / finish
                self.modules.append(importlib.import_module(kind))
                self.modules[-1].init(project="alol", group=group, name=f"{group}/{os.path.basename(run_dir)}",
                                      config=dataclasses.asdict(args))

    def log(self, row: dict):
        scalars = {k: v for k, v in row.items() if k != "step"}
        for writer in self.writers:
            for k, v in scalars.items():
                writer.add_scalar(k, v, row["step"])
        for module in self.modules:
            module.log(scalars, step=row["step"])

    def close(self):
        for writer in self.writers:
            writer.close()
        for module in self.modules:
            module.finish()


def write_curves(out_dir: str, stages: list, clip_eps):
    """curves.png: per optimiser step, one line per stage: loss, mean ratio with the clip band, clipped share, mean A+
    (the methods only: the NLL reference stage has no ratio and no advantage), and the validation reward."""
    if not is_main():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {"loss": "loss", "ratio": "mean ratio pi/pi_ref (clipped)", "clip_frac": "share of the batch clipped",
              "adv": "mean A+ of the batch", "val_reward": "validation reward (--eval-every)"}
    fig, grid = plt.subplots(2, 3, figsize=(15, 7.5))
    axes, key_ax = grid.flat[:5], grid.flat[5]  # the last cell holds one legend for every panel
    for color, stage in enumerate(stages):
        log = os.path.join(out_dir, stage, "log.jsonl")
        rows = [json.loads(line) for line in open(log)] if os.path.exists(log) else []  # none: --ref-model given
        for ax, key in zip(axes, panels):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points and not (stage == "reference" and key in ("ratio", "clip_frac", "adv")):
                ax.plot(*zip(*points), color=f"C{color}", label=stage, marker="o" if key == "val_reward" else None)
    if clip_eps is not None:
        axes[1].axhspan(max(1 - clip_eps, 0), 1 + clip_eps, color="gray", alpha=0.15, label=f"clip band 1 ± {clip_eps}")
    for ax, title in zip(axes, panels.values()):
        ax.set(title=title, xlabel="optimiser step")
        ax.grid(alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, "off", ha="center", transform=ax.transAxes)
    legend = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels())}
    key_ax.legend(legend.values(), legend.keys(), loc="center", title="stage")
    key_ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "curves.png"), dpi=100)
    plt.close(fig)


def write_report(results: dict, advantage: torch.Tensor, out_dir: str) -> str:
    """results.json, results.md (the printed table, returned) and results.png (reward per method, advantages)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {"data": {**results["data"], "reward_sampled": results["data"]["reward"]}, "reference": results["reference"],
            **results["methods"]}
    comps = list(results["data"]["components"])
    columns = ["", "reward (sampled)", "reward (greedy)", *comps, "distinct-1", "distinct-2", "length"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name, m in rows.items():
        cells = [m["reward_sampled"], m.get("reward_greedy"), *(m["components"].get(c) for c in comps), m["distinct_1"],
                 m["distinct_2"], m["length"]]
        lines.append(f"| {name} | " + " | ".join("–" if c is None else f"{c:.3f}" for c in cells) + " |")
    subsets = [(name, subset, s) for name, m in rows.items() for subset, s in m.get("subsets", {}).items()]
    if subsets:  # the paper's HH table
        keys = ("reward", "distinct_1", "distinct_2", "distinct_3", "length")
        lines += ["", "Per test subset: the offline responses (data) and each model's deterministic decode.", "",
                  "|  | subset | reward | distinct-1 | distinct-2 | distinct-3 | length |", "|" + "---|" * 7]
        lines += [f"| {name} | {subset} | " + " | ".join(f"{s[k]:.3f}" for k in keys) + " |"
                  for name, subset, s in subsets]
    table = "\n".join(lines)
    write_atomic(os.path.join(out_dir, "results.json"), json.dumps(results, indent=1))
    write_atomic(os.path.join(out_dir, "results.md"), f"# A-LoL results: task {results['task']}, seed {results['seed']}"
                 f"\n\nMean over {results['n_test']} test prompts; components and distinct-n of the sampled "
                 "generations."
                 f"\n\n{table}\n")
    if not is_main():
        return table
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    bars = left.bar(list(rows), [m["reward_sampled"] for m in rows.values()], color="tab:blue", label="sampled")
    left.bar_label(bars, fmt="%.2f")
    models = list(rows)[1:]  # the data has no greedy decode
    left.plot(models, [rows[m]["reward_greedy"] for m in models], "o", color="tab:orange", label="greedy")
    left.set(ylabel="mean test reward", title="reward of test generations")
    left.tick_params(axis="x", rotation=30)
    left.legend()
    right.hist(advantage.numpy(), bins=60, color="tab:gray")
    right.axvline(0, color="black")
    right.set(xlabel="A = R - V(x)", ylabel="training examples",
              title=f"advantages: {(advantage > 0).float().mean():.0%} positive (kept by A-LoL)")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "results.png"), dpi=110)
    plt.close(fig)
    return table


def cli(argv: list) -> int:
    """`python alol.py`: an error is one line (exit 1); Ctrl-C is one line with the stage, the step and the command
    that resumes the run (exit 130)."""
    try:
        main(parse_args(argv))
        if dist.is_initialized():
            dist.destroy_process_group()
        return 0
    except AlolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # where it stopped: the innermost function of this file, and main's run directory
        frames = {f.f_code.co_name: f.f_locals for f, _ in traceback.walk_tb(e.__traceback__)
                  if f.f_code.co_filename == __file__}
        stage, training = list(frames)[-1], frames.get("train_policy", {})
        if "step" in training:
            stage = f"training {training['algo']}, step {training['step'] + 1}"
        out_dir, again = frames.get("main", {}).get("out_dir"), [a for a in argv if a not in ("--resume", "--overwrite")]
        if out_dir and "--out-dir" not in again:
            again += ["--out-dir", out_dir]
        hint = f"to continue: python {sys.argv[0]} {shlex.join(again + ['--resume'])}" if out_dir else \
            "nothing was written yet"
        print(f"\ninterrupted in {stage}; {hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
