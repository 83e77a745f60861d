"""A-LoL (Advantage-Leftover-Lunch RL): offline policy-gradient training of a language model on pre-existing data, with
a sequence-level reward, a value estimate from the frozen reference policy, training only on positive-advantage
examples, and a clipped sequence importance weight.

Paper: Baheti et al., "Leftover-Lunch: Advantage-based Offline Reinforcement Learning for Language Models",
ICLR 2024, https://arxiv.org/abs/2305.14718. This file is the algorithm, read top to bottom in the order it runs;
tutorial.md follows its numbered sections. Tasks live in tasks/, the run machinery (run directory, checkpoints,
caches, input checks, model loading, torchrun, trackers, the command line) in the modules it imports.

    python alol.py                  # embedded offline task `toy`: reference, nll and a_lol in ~2 min on 2 CPU cores
    python alol.py --algo all       # all eight losses from the same reference
    python alol.py --task reddit    # the paper's Reddit task with DialoGPT-medium, on one GPU (README)
    python alol.py --task hh        # the paper's Anthropic HH task with Qwen2.5-0.5B, on one GPU (README)
    torchrun --standalone --nproc_per_node 2 alol.py    # data parallel: one process per GPU (gloo on CPU)
    python alol.py --help           # every setting, grouped
"""
import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import caches
import checkpoints
import checks
import cli
import distributed
import kernels
import models
import progress
import rundir
import tasks
import tracking
from cli import opt
from distributed import data_parallel, mean_over_processes, shard_map, world
from scoring import score


# ---------------------------------------------------------------------------------------------------------------
# 1. Settings
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Args:
    # run
    task: str = opt("toy", "task, a module of tasks/ with its data, reward and preset (`toy`: embedded, offline)")
    algo: str = opt("nll,a_lol", "comma list of methods from the same reference, or `all` (dpo, pro: on paired data)")
    seed: int = opt(0, "seed for data, initialisation, sampling order and generation")
    out_dir: str = opt("", "run directory (default runs/<task or --train-file name>-seed<seed>-<time>)")
    overwrite: bool = opt(False, "replace an --out-dir that holds a different run")
    resume: bool = opt(False, "continue the run in --out-dir from its last checkpoints")
    cache_dir: str = opt(".cache/alol", "where reference log-probs and V(x) are cached between runs")
    device: str = opt("auto", "auto (cuda if available), cpu or cuda")
    kernel: str = opt("auto", "log-prob backend of kernels/: auto (Triton on CUDA), torch or triton",
                      ["auto", "torch", "triton"])
    bf16: bool = opt(True, "bf16 autocast on CUDA; log-probs, ratios and the loss stay fp32")
    report_to: str = opt("tensorboard", "comma list of trackers for every training step and validation: tensorboard, "
                         "wandb, trackio, or none (log.jsonl and curves.png are always written)")
    # data and rewards (each task adds its own settings: tasks/<task>.py, SETTINGS)
    train_file: str = opt("", "JSONL with prompt, response and reward (or a dict `rewards`); replaces the task's data")
    val_file: str = opt("", "JSONL of the same form; its prompts train the value head")
    test_file: str = opt("", "JSONL of the same form; its prompts are generated on for evaluation")
    n_train: int = opt(8000, "training examples: toy generates this many; other tasks keep at most this many (0 = all)")
    n_val: int = opt(600, "validation examples (value-head prompts, and --eval-every's); reddit: per CSV file")
    n_test: int = opt(400, "test examples (toy: prompts unseen in training); reddit: per CSV file; hh: per test subset")
    max_prompt_len: int = opt(24, "prompt tokens kept (left-truncated: the end of the prompt matters most)")
    max_response_len: int = opt(32, "response tokens kept incl. the final EOS (right-truncated)")
    reward_fn: str = opt("", "`module:function` scoring (prompts, responses) -> {name: tensor in [0, 1]}")
    # reference policy
    model: str = opt("", "Hugging Face id or path of the initial policy; empty = the task's own tiny GPT-2")
    ref_model: str = opt("", "path of a trained reference policy; skips the NLL reference stage")
    ref_epochs: int = opt(3, "epochs of NLL on the training data that make the reference (the paper's recipe)")
    ref_lr: float = opt(1e-3, "learning rate of the reference stage")
    # value estimate
    value_samples: int = opt(8, "reference samples per validation prompt; V's target is their mean reward")
    value_target: str = opt("sampled", "V's target per validation prompt: the mean reward of --value-samples samples, "
                            "or of one deterministic decode (`greedy`, the official HH's)", ["sampled", "greedy"])
    value_epochs: int = opt(30, "value-head epochs; the best held-out epoch is kept")
    value_lr: float = opt(1e-3, "value-head learning rate")
    # A-LoL training
    epochs: int = opt(2, "epochs of each method over its training set (the kept set for A-LoL variants)")
    lr: float = opt(1e-3, "learning rate of each method")
    batch_size: int = opt(64, "sequences per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimiser step (the update equals one batch_size*grad_accum batch)")
    weight_decay: float = opt(0.01, "AdamW weight decay (official: 0.01)")
    adam_eps: float = opt(1e-8, "AdamW epsilon (official Reddit: torch's 1e-8; HH: 1e-6)")
    lr_schedule: str = opt("linear", "learning rate over the optimiser steps: `linear` decay to 0, or `constant` (the "
                           "official HH's)", ["linear", "constant"])
    max_grad_norm: float = opt(1.0, "gradient-norm clip (official: 1.0)")
    clip_eps: float = opt(0.9, "importance weight clipped to [1-eps, 1+eps]; `none` = no clip (official HH: 0.9)")
    kl_beta: float = opt(0.1, "beta of a_lol_kl")
    priority_sampling: bool = opt(True, "the official -ts option: A-LoL variants keep A>0 only and draw P ~ A+; wbc, "
                                  "r_gold and r_lol draw P ~ R; nll is uniform (shuffled epochs)")
    save_every: int = opt(100, "optimiser steps between checkpoints (always saved at the end)")
    # preference baselines: --batch-size pairs of replies per micro-batch
    dpo_beta: float = opt(0.1, "beta of dpo (official: 0.1)")
    dpo_reference_free: bool = opt(False, "dpo without pi_ref: its log-probs taken as 0 (official --reference_free)")
    pro_sft_weight: float = opt(0.05, "pro: weight of the SFT term on the preferred reply, x (n-1)^2 (official: 0.05)")
    pro_temperature: float = opt(1.0, "pro: its temperatures are the reward gaps times this (official: 1, on raw "
                                 "reward-model logits; HH's rewards here are their sigmoid)")
    # bigger models
    lora_r: int = opt(0, "LoRA rank (peft): train adapters on a frozen base instead of every weight; 0 = full training")
    lora_alpha: float = opt(16.0, "LoRA scale alpha (the update is alpha/r * B A)")
    lora_dropout: float = opt(0.0, "LoRA dropout; keep 0, or the ratio pi/pi_ref is not 1 at step 0")
    lora_targets: str = opt("all-linear", "modules that get adapters (peft's target_modules; a comma list of names, or "
                            "all-linear: every linear layer but the output layer)")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass: less memory, ~30% slower")
    # evaluation
    eval_every: float = opt(0.0, "validation reward (deterministic decode) every N optimiser steps, keeping the best "
                            "checkpoint for the final evaluation; a value below 1 is a share of an epoch; 0 = off")
    eval_max_new_tokens: int = opt(32, "generated tokens per test prompt, and per reference sample for V(x)")
    eval_num_beams: int = opt(1, "beams of the deterministic decode (1 = greedy)")
    eval_repetition_penalty: float = opt(1.0, "repetition penalty of the deterministic decode")
    eval_stop: str = opt("", "strings that end a generation besides EOS, `|`-separated (every decode: test, "
                         "validation, V's targets)")
    eval_batch_size: int = opt(200, "sequences per batch of every pass without gradient: generation (test and V's "
                               "samples), reward models, reference log-probs and V(x)")


ARG_GROUPS = {"task": "run", "train_file": "data and rewards", "model": "reference policy",
              "value_samples": "value estimate", "epochs": "A-LoL training", "dpo_beta": "preference baselines",
              "lora_r": "bigger models", "eval_every": "evaluation"}
ALGOS = ["nll", "wbc", "r_gold", "r_lol", "a_lol", "a_lol_ref_free", "a_lol_seq", "a_lol_kl"]
PAIR_ALGOS = ["dpo", "pro"]  # the paper's preference baselines: they train on pairs of replies (section 6)


def parse_args(argv=None) -> Args:
    """Args and every task's own settings from the command line, the chosen task's PRESET as defaults (tasks/); a bad
    value exits 2 (cli.py)."""
    return cli.parse(Args, ARG_GROUPS, ALGOS + PAIR_ALGOS, __doc__.split("\n\n")[0], argv)


# ---------------------------------------------------------------------------------------------------------------
# 2. Data: records {prompt, response, rewards: {component: float}}, their reward R and their token layout
# ---------------------------------------------------------------------------------------------------------------
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
    if records and all("rejected" in r for r in records):  # pairs: row i's dispreferred reply, a layout of its own
        data["rejected"] = encode([{"prompt": r["prompt"], **r["rejected"]} for r in records], tok, args)
    return data


def take(data: dict, idx: torch.Tensor, device="cpu") -> dict:
    """Rows `idx` of every tensor (and of a nested layout), cut to the longest of those rows, on `device`."""
    width = int(data["attention_mask"][idx].sum(1).max())
    return {k: take(v, idx, device) if isinstance(v, dict) else (v[idx, :width] if v.dim() == 2 else v[idx]).to(device)
            for k, v in data.items()}


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
    decode = {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0} if sample else \
        {"do_sample": False, "num_beams": args.eval_num_beams, "repetition_penalty": args.eval_repetition_penalty}
    if args.eval_stop:  # stop strings are matched on the decoded text, so generate() needs the tokenizer
        decode.update(stop_strings=args.eval_stop.split("|"), tokenizer=tok)
    finish = getattr(tasks.get(args.task), "postprocess", str.strip)  # the task's cut of a reply (HH: at a next turn)
    # Left padding and left truncation: new tokens are appended at the right end (encode() pads on its own).
    tok.padding_side = tok.truncation_side = "left"

    def decode_batch(batch, k):
        with torch.random.fork_rng(devices=[args.device] if args.device.startswith("cuda") else []):
            torch.manual_seed(args.seed + k)  # batch k's draws: the same whatever ran before, on any process
            enc = tok(batch, return_tensors="pt", padding=True, truncation=True, max_length=args.max_prompt_len,
                      add_special_tokens=False).to(args.device)
            out = model.generate(**enc, max_new_tokens=args.eval_max_new_tokens, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id, **decode)
        return [finish(r) for r in tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]

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
    """As the paper: V is trained with MSE on the rewards of reference replies to validation prompts: one
    deterministic decode each (--value-target greedy, the official HH's), or the mean of --value-samples samples.
    Departure from the official code: the epoch is chosen on a held-out share of the prompts rather than on training
    MSE. Returns the head and a report of its fit."""
    prompts = sorted({r["prompt"] for r in val_records})  # 2 or more (preflight): one is held out
    k = args.value_samples if args.value_target == "sampled" else 1
    repeated = [p for p in prompts for _ in range(k)]
    scores = score(reward_fn, repeated, generate(ref, tok, repeated, args, sample=args.value_target == "sampled"))
    target = scores["reward"].view(len(prompts), k).mean(1)  # (P,) V_ref(x): Monte-Carlo, or the greedy reply's
    # Causal attention: the prompt positions' hidden states are the same with or without a response after them.
    data = encode([{"prompt": p, "response": "", "rewards": {}} for p in prompts], tok, args)
    perm = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed))
    n_held = max(1, int(len(prompts) * VALUE_HELDOUT_SHARE))
    held, fit = perm[:n_held], perm[n_held:]
    max_value = len(scores) - 1  # every component lies in [0, 1]
    value_head = ValueHead(ref.config.hidden_size, max_value).to(args.device)
    with torch.no_grad():  # start at the mean target: the sigmoid then only has to learn the differences
        value_head.out.bias.fill_(torch.logit(target[fit].mean() / max_value, eps=1e-4).item())
    # No weight decay: the epoch picked on held-out MSE regularises the head's 4H^2 + 6H + 1 parameters (66 k for
    # the toy's H = 128, 4.2 M for DialoGPT-medium's 1024), fitted to a few hundred or thousand targets.
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
    for epoch in progress.Stage(range(1, args.value_epochs + 1), "value head", unit="epoch", leave=False):
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
# 5. Advantages A = R - V(x): the frozen reference's log-probs and V(x), computed once
# ---------------------------------------------------------------------------------------------------------------
def frozen_quantities(ref, tok, train: dict, val_records: list, reward_fn, args: Args) -> dict:
    """Per-token reference log-probs [N, T] and V(x) [N] for every training example, and the value head's report;
    with pairs, also those of the dispreferred replies (`ref_logp_rejected`, DPO's reference).

    Computed once (main caches them): valid because pi_ref and the data are both fixed, so one model is in memory
    instead of the official second copy run every step. One pass of the reference gives both.
    """
    value_head, fit_report = train_value_head(ref, tok, val_records, reward_fn, args)
    out = {"value_report": fit_report}
    pairs = [("_rejected", train["rejected"])] if "rejected" in train else []  # the dispreferred replies
    for name, data in [("", train), *pairs]:
        ref_logp, value = torch.zeros(data["input_ids"].shape), torch.zeros(len(data["reward"]))

        @torch.no_grad()
        def reference_pass(idx, position):
            batch = take(data, torch.tensor(idx), args.device)
            hidden = hidden_states(ref, batch, args)  # (b, T, H): one pass gives log-probs and V's input
            logp = token_logprobs(ref, batch, args, hidden).cpu()  # (b, T) log pi_ref
            return logp, value_head(hidden.float(), batch["prompt_mask"]).cpu()

        for idx, (logp, v) in zip(torch.arange(len(value)).split(args.eval_batch_size), shard_map(
                reference_pass, list(range(len(value))), args.eval_batch_size, "reference log-probs")):
            ref_logp[idx, :logp.shape[1]], value[idx] = logp, v  # (b, T) log pi_ref, (b,) V(x)
        out["ref_logp" + name] = ref_logp
        out.setdefault("value", value)  # V(x) of the prompts, the same for both replies
    return out


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


def pair_loss(logp, ref_logp, length, reward, algo="dpo", beta=0.1, reference_free=False, sft_weight=0.05,
              temperature=1.0, return_stats=False):
    """The paper's preference baselines on n replies per prompt, the preferred first: DPO (Rafailov et al., 2023;
    n = 2) and PRO (Song et al., 2024), as the official dpo_qlora_llama_hh.py and pro_qlora_llama_hh.py.

    Formula (dpo):  loss = -mean_b log sigmoid(beta * ((L_b0 - L_b1) - (Lref_b0 - Lref_b1)))
    Formula (pro):  loss = sum_{k<n-1} mean_b [log(eps + e^(s_bk tau_bk) + sum_{j>k} e^(s_bj tau_bkj)) - s_bk tau_bk]
                           + sft_weight * (n-1)^2 * mean_b(-L_b0)
    Where: L_bi = sum_t m_t logp_t is reply i's sequence log-prob under pi_theta, Lref under pi_ref (0 if
    reference_free; PRO has no reference); s_bi = L_bi / length_bi its mean per token; tau_bkj = temperature *
    (R_bk - R_bj), the reward gaps; tau_bk = max_j tau_bkj; eps = 1e-10. Unlike A-LoL: pairs, no V(x), no A > 0 filter.
    Shapes: logp (with grad), ref_logp, length, reward: [B, n]. PRO's log-sum-exp has the official plain exp's value
    without its overflow. With return_stats, also {pair_acc}: the share of prompts whose reply 0 the policy ranks
    first (dpo: by the implicit reward beta * (L - Lref), whose mean gap is `margin`; pro: by s).
    """
    if algo == "dpo":
        ref_logp = torch.zeros_like(logp) if reference_free else ref_logp.detach()
        loss = -F.logsigmoid(beta * ((logp[:, 0] - logp[:, 1]) - (ref_logp[:, 0] - ref_logp[:, 1]))).mean()
        score = beta * (logp.detach() - ref_logp)  # (B, 2) DPO's implicit rewards
    elif algo == "pro":
        eps, n, reward = 1e-10, logp.shape[1], temperature * reward.detach()  # eps: the official constant
        score, loss = logp / length, 0.0  # (B, n) s: mean token log-probs
        for k in range(n - 1):  # reply k against every reply ranked below it
            tau = reward[:, k:k + 1] - reward[:, k + 1:]  # (B, n-k-1) temperatures
            top = score[:, k] * tau.max(1).values  # (B,) s_k tau_k
            terms = torch.cat([top[:, None], score[:, k + 1:] * tau, torch.full_like(top[:, None], math.log(eps))], 1)
            loss = loss + (terms.logsumexp(1) - top).mean()
        loss = loss + sft_weight * (n - 1) ** 2 * (-logp[:, 0]).mean()
    else:
        raise ValueError(f"unknown pair algo {algo!r}")
    if not return_stats:
        return loss
    acc = (score[:, 0] > score[:, 1:].max(1).values).float().mean().item()
    return loss, {"pair_acc": acc, **({"margin": (score[:, 0] - score[:, 1]).mean().item()} if algo == "dpo" else {})}


# ---------------------------------------------------------------------------------------------------------------
# 7. Training: the sampling schedule, one optimiser step, the loop
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
    micro-batches; returns the step's statistics. forward(batch) -> (b, T) log pi_theta, with gradient.

    frozen = {"ref_logp": [N, T], "value": [N]} of the frozen reference, or None for the NLL reference stage, which
    has no reference yet: there rho = 1 and V = 0 (NLL's weight uses neither). dpo and pro read each example's
    `rejected` reply too, and its reference log-probs frozen["ref_logp_rejected"].
    """
    stats, micro = [], indices.chunk(args.grad_accum)
    for i, idx in enumerate(micro):
        batch = take(data, idx, args.device)
        # Under torchrun the gradients are averaged over the processes once per step, in the last backward.
        with forward.no_sync() if hasattr(forward, "no_sync") and i < len(micro) - 1 else contextlib.nullcontext():
            if algo in PAIR_ALGOS:  # the data's reply and the rejected one, ranked by reward (a tie keeps this order)
                replies, refs = [batch, batch["rejected"]], [frozen["ref_logp"], frozen["ref_logp_rejected"]]
                logp = torch.stack([forward(x).sum(-1) for x in replies], 1)  # (b, 2) sequence log-probs, with grad
                ref_logp = torch.stack([r[idx].sum(-1) for r in refs], 1).to(args.device)  # (b, 2) of pi_ref
                length = torch.stack([x["response_mask"].sum(-1) for x in replies], 1)  # (b, 2) reply tokens
                reward = torch.stack([x["reward"] for x in replies], 1)  # (b, 2) R
                rank = reward.argsort(dim=1, descending=True, stable=True)  # (b, 2): the preferred reply first
                ranked = [x.gather(1, rank) for x in (logp, ref_logp, length, reward)]
                loss, s = pair_loss(*ranked, algo, args.dpo_beta, args.dpo_reference_free, args.pro_sft_weight,
                                    args.pro_temperature, return_stats=True)
            else:
                logp = forward(batch)  # (b, T) log pi_theta, with grad
                if frozen is None:
                    ref_logp, value = logp.detach(), torch.zeros_like(batch["reward"])
                else:
                    ref_logp = frozen["ref_logp"][idx, :logp.shape[1]].to(args.device)  # (b, T) log pi_ref
                    value = frozen["value"][idx].to(args.device)  # (b,) V(x)
                loss, s = alol_loss(logp, ref_logp, batch["response_mask"], batch["reward"], value, algo,
                                    args.clip_eps, args.kl_beta, return_stats=True)
            # Divide by the micro-batch count: the update is the mean over the whole batch, as one big batch would
            # give (the official code summed micro-batch means; huggingface/trl#2615).
            (loss / args.grad_accum).backward()
        stats.append({"loss": loss.item(), **s})
    grad_norm = nn.utils.clip_grad_norm_(forward.parameters(), args.max_grad_norm).item()
    means = torch.tensor([[s[k] for k in stats[0]] for s in stats], dtype=torch.float64).mean(0)  # (stats,)
    means = mean_over_processes(means, args.device)  # the whole step's, under torchrun
    if not all(math.isfinite(x) for x in [grad_norm, *means.tolist()]):  # before NaN reaches the weights
        raise FloatingPointError(f"loss {means[0].item()}, gradient norm {grad_norm}")
    optim.step()
    optim.zero_grad(set_to_none=True)
    return {"grad_norm": grad_norm, **dict(zip(stats[0], means.tolist()))}


def train_policy(policy, tok, data: dict, algo: str, run_dir: str, args: Args, epochs: int, lr: float, frozen=None,
                 priority=None, validate=None):
    """Train `policy` in place with `algo` for `epochs`; checkpoints, log.jsonl and best/ go to run_dir
    (checkpoints.Stage), and --resume continues from the last checkpoint with the same batches and optimiser state,
    so the weights end up identical. frozen: the reference's cached quantities (train_step); priority: A+ or R
    for priority sampling, or None. validate(policy) -> validation reward, every --eval-every steps: the best step's
    weights are the result. With --lora-r a LoRA adapter is trained, then merged. Returns {step, val_reward} of the
    selected step, or None. Under torchrun every step's global batch is split over the processes."""
    adapter = models.for_training(policy, args)  # a fresh LoRA adapter with --lora-r, else None
    rank, size = world()
    schedule = sampling_schedule(len(data["reward"]), priority, epochs, args.batch_size * args.grad_accum * size,
                                 args.seed)  # (steps, global batch): the same batches on any number of processes
    optim = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr, eps=args.adam_eps,
                              weight_decay=args.weight_decay)
    # Linear decay over optimiser steps (the official Reddit schedule counted micro-batches and ended at half the
    # LR), or constant (the official HH: get_constant_schedule, whose warmup argument is ignored).
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda step: 1 - step / len(schedule)
                                              if args.lr_schedule == "linear" else 1.0)
    stage = checkpoints.Stage(adapter or policy, tok, optim, sched, run_dir, args, len(schedule), epochs, validate)
    forward = data_parallel(policy, lambda model, batch: token_logprobs(model, batch, args), args.device)
    policy.train()
    for step in stage.steps():
        row = {"step": step + 1, "lr": sched.get_last_lr()[0],
               **train_step(forward, optim, data, schedule[step].chunk(size)[rank], algo, args, frozen)}
        sched.step()
        stage.record(step, row, policy)  # log.jsonl, trackers; validation and checkpoints when due
    return stage.finish(policy)


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
    rundir.write_atomic(os.path.join(run_dir, "generations.jsonl"), "".join(
        json.dumps({"prompt": p, "sampled": s, "greedy": g, "reward_sampled": r, "reward_greedy": rg}) + "\n"
        for p, s, g, r, rg in zip(prompts, sampled, greedy, scores["reward"].tolist(), greedy_reward.tolist())))
    rundir.write_atomic(metrics_path, json.dumps(metrics, indent=1))
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# 9. main: the reference stage once, then every method from the same reference and cached quantities
# ---------------------------------------------------------------------------------------------------------------
def main(args: Args) -> dict:
    args.device = distributed.init(args.device)  # under torchrun: this process's device
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    # Everything that can fail on bad input happens before the run directory is touched.
    task, splits, reward_fn, test_reward_fn = tasks.load(args)  # the task's data (or yours) and its reward functions
    source = args.ref_model or args.model  # a trained reference, or the initial policy; none: a tiny GPT-2
    tok = models.load_tokenizer(source) if source else models.bpe_tokenizer(splits["train"])
    ref = disable_dropout(models.load_policy(source, args) if source else models.tiny_gpt2(tok, args).to(args.device))
    paired = all("rejected" in r for r in splits["train"])  # `all` adds dpo and pro where the data has pairs
    algos = ALGOS + PAIR_ALGOS * paired if args.algo == "all" else args.algo.split(",")
    checks.preflight(args, splits, reward_fn, tok, ref, [a for a in algos if a in PAIR_ALGOS])
    out_dir = rundir.prepare(args, caches.run_fingerprints(args, reward_fn, task.data_files(args), splits))
    train = encode(splits["train"], tok, args)
    tracking.print_settings(args, out_dir)  # every setting, the run directory, the global batch

    # The reference policy: given, or NLL on the training data from the initial policy (the paper's recipe)
    ref_dir = os.path.join(out_dir, "reference")
    val_prompts = sorted({r["prompt"] for r in splits["val"]})

    def validate(policy):  # for --eval-every: the deterministic decode's mean reward on the validation prompts
        responses = generate(policy, tok, val_prompts, args, sample=False)
        return score(reward_fn, val_prompts, responses)["reward"].mean().item()

    if not args.ref_model:  # trains the initial policy in place: from here on it is pi_ref
        ref_selected = train_policy(ref, tok, train, "nll", ref_dir, args, args.ref_epochs, args.ref_lr,
                                    validate=validate)
        tracking.write_curves(out_dir, ["reference"], args.clip_eps)
    ref.requires_grad_(False)
    test = splits["test"]
    data_scores = {k: torch.tensor([r["rewards"].get(k, 0.0) for r in test]) for k in test[0]["rewards"]}
    data_scores["reward"] = sum(data_scores.values())
    results = {"task": args.task, "seed": args.seed, "n_test": len(test), "algos": algos,
               "scored_by": tracking.scored_by(reward_fn, test_reward_fn),
               "data": {**text_metrics([r["response"] for r in test], data_scores),
                        **subset_metrics(test, [r["response"] for r in test], data_scores)},
               "reference": {**evaluate(ref, tok, test, test_reward_fn, args, ref_dir),
                             "selected": None if args.ref_model else ref_selected}}
    print(f"offline data reward {results['data']['reward']:.3f}; reference reward "
          f"{results['reference']['reward_sampled']:.3f} sampled, {results['reference']['reward_greedy']:.3f} greedy")

    # V(x) and the advantages of the training data, with the frozen reference; cached under a key of all they read
    frozen = caches.frozen(ref, train, encode(splits["val"], tok, args), reward_fn, args,
                           lambda: frozen_quantities(ref, tok, train, splits["val"], reward_fn, args))
    del ref  # the methods need only the cached quantities: one model in memory from here on
    advantage = train["reward"] - frozen["value"]  # (N,) A = R - V(x)
    results.update(value=frozen["value_report"], advantage=tracking.advantage_stats(advantage))
    v, a = results["value"], results["advantage"]
    print(f"value head: held-out MSE {v['heldout_mse']:.3f} (a constant predictor: {v['heldout_mse_of_mean']:.3f}); "
          f"A = R - V: mean {a['mean']:+.3f}, median {a['median']:+.3f}, {a['frac_positive']:.1%} positive "
          f"({int((advantage > 0).sum())} of {len(advantage)} examples kept by A-LoL)")
    checks.something_to_learn(advantage, algos, out_dir)  # A-LoL needs some A > 0

    # Each method from the same reference, then its evaluation
    results["methods"] = {}
    for i, algo in enumerate(algos):
        ref_weights = "model" if args.lora_r else "best" if args.eval_every else "checkpoint"
        policy = disable_dropout(models.load_policy(args.ref_model or os.path.join(ref_dir, ref_weights), args))
        # The official -ts: the A-LoL variants draw P ~ A+, the reward-weighted baselines P ~ R, nll, dpo, pro uniformly
        priority = None if algo in ("nll", *PAIR_ALGOS) or not args.priority_sampling else \
            advantage.clamp(min=0) if algo.startswith("a_lol") else train["reward"]
        start = time.time()
        selected = train_policy(policy, tok, train, algo, os.path.join(out_dir, algo), args, args.epochs, args.lr,
                                frozen, priority, validate)
        seconds = round(time.time() - start, 1)
        results["methods"][algo] = {**evaluate(policy, tok, test, test_reward_fn, args, os.path.join(out_dir, algo)),
                                    "train_seconds": seconds, "selected": selected}
        print(f"{algo}: reward {results['methods'][algo]['reward_sampled']:.3f} sampled, "
              f"{results['methods'][algo]['reward_greedy']:.3f} greedy")
        tracking.write_curves(out_dir, ["reference", *algos[:i + 1]], args.clip_eps)
        del policy
    table = tracking.write_report(results, advantage, out_dir)
    print(f"\n{table}\n\nresults: {out_dir}/results.json, results.md, results.png, curves.png")
    return results


if __name__ == "__main__":
    sys.exit(cli.run(main, parse_args, sys.argv[1:]))
