"""The command line: flags built from the settings, every value checked before anything runs (exit 2), and a run's
one-line errors (exit 1) and interruption (exit 130)."""
import argparse
import math
import os
import re
import shlex
import sys
import traceback
from dataclasses import fields

import torch
import torch.distributed as dist

import progress
import tasks

PROJECT = os.path.dirname(os.path.abspath(__file__))


class AlolError(Exception):
    """A user-facing error: printed as one line, no traceback."""


def parse(settings, groups: dict, algos: list, description: str, argv=None):
    """`settings` (the Args dataclass) from the command line: one flag per field, in argparse groups opening at the
    fields named in `groups`, with the chosen task's preset as the defaults (so --help shows them)."""
    def optional_float(s):
        return None if s.lower() == "none" else float(s)

    p = argparse.ArgumentParser(description=description)
    choices = {"task": list(tasks.NAMES), "kernel": ["auto", "torch", "triton"], "reddit_train": ["pos", "neg"],
               "hh_train": ["chosen", "both"]}
    group = p
    for f in fields(settings):
        group = p.add_argument_group(groups[f.name]) if f.name in groups else group
        flag, kind = "--" + f.name.replace("_", "-"), type(f.default)
        help = f.metadata["help"] + ("" if f.default == "" else " (default: %(default)s)")
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help)
        else:
            group.add_argument(flag, type=optional_float if f.name == "clip_eps" else kind, default=f.default,
                               help=help, choices=choices.get(f.name))
    pre = argparse.ArgumentParser(add_help=False)  # the task first: its preset sets the defaults --help shows
    pre.add_argument("--task", default=settings.task)
    task = pre.parse_known_args(argv)[0].task
    p.set_defaults(**(tasks.get(task).PRESET if task in tasks.NAMES else {}))
    args = settings(**vars(p.parse_args(argv)))
    why = settings_error(args, algos)
    if why:
        p.error(why)
    return args


def settings_error(args, algos: list) -> str:
    """Why the settings cannot run, or "": each check here once found a run that went wrong silently or late."""
    chosen = args.algo.split(",")
    unknown = [a for a in chosen if a not in algos + ["all"]]
    if unknown:
        return f"unknown --algo {','.join(unknown)!r}; choose from {', '.join(algos)} or all"
    if len(set(chosen)) < len(chosen) or ("all" in chosen and len(chosen) > 1):
        return "--algo names each method once, or is `all` alone"
    if args.clip_eps is not None and not (math.isfinite(args.clip_eps) and args.clip_eps > 0):
        return "--clip-eps must be a finite number > 0, or `none` for no clipping"
    positive = ("lr", "ref_lr", "value_lr", "max_grad_norm", "eval_repetition_penalty", "lora_alpha")
    non_negative = ("weight_decay", "kl_beta", "lora_dropout", "lora_r")
    for k in positive + non_negative:  # a negative clip norm or decay silently ascends the loss; NaN spreads
        value = getattr(args, k)
        if not math.isfinite(value) or value < 0 or (value == 0 and k in positive):
            return f"--{k.replace('_', '-')} must be a finite number {'> 0' if k in positive else '>= 0'}"
    if set(args.report_to.split(",")) - {"none", "tensorboard", "wandb", "trackio"}:
        return f"--report-to {args.report_to!r}: a comma list of tensorboard, wandb, trackio, or none"
    if not 0 <= args.eval_every < math.inf or (args.eval_every > 1 and args.eval_every % 1):
        return "--eval-every must be a whole number of steps, a share of an epoch below 1, or 0"
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        return f"--device {args.device!r}: choose auto, cpu, cuda or cuda:N"
    if args.device.startswith("cuda") and int(args.device.partition(":")[2] or 0) >= torch.cuda.device_count():
        return f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    sizes = ["epochs", "ref_epochs", "batch_size", "grad_accum", "value_samples", "n_val", "n_test", "max_prompt_len",
             "max_response_len", "save_every", "eval_max_new_tokens", "eval_num_beams", "eval_batch_size"]
    too_small = [k for k in sizes + ["n_train"] * (args.task == "toy") if getattr(args, k) < 1]
    if too_small:
        return f"--{too_small[0].replace('_', '-')} must be at least 1"
    files = [args.train_file, args.val_file, args.test_file]
    if any(files) and not all(files):
        return "--train-file, --val-file and --test-file go together"
    return ""


def run(main, parse_args, argv: list) -> int:
    """main(parse_args(argv)) with the errors a user meets as one line: a bad input or non-finite training (exit 1);
    Ctrl-C with the stage, the step and the command that resumes the run (exit 130)."""
    progress.OPEN.clear()  # stages of an earlier run in this process (tests) are not this one's
    progress.FINISHED.clear()
    try:
        main(parse_args(argv))
        if dist.is_initialized():
            dist.destroy_process_group()
        return 0
    except AlolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except FloatingPointError as e:  # raised by train_step before the update: nothing non-finite was saved
        stage, training, _ = where(e)
        print(f"error: non-finite values {stage} ({e}); stopped before updating or saving the weights. Try a lower "
              f"learning rate (now {training['lr']}) or --max-grad-norm.", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        stage, _, out_dir = where(e)
        again = [a for a in argv if a not in ("--resume", "--overwrite")]
        if out_dir and "--out-dir" not in again:
            again += ["--out-dir", out_dir]
        hint = f"to continue: python {sys.argv[0]} {shlex.join(again + ['--resume'])}" if out_dir else \
            "nothing was written yet"
        print(f"\ninterrupted {stage}; {hint}", file=sys.stderr)
        return 130


def where(error: BaseException) -> tuple:
    """Where a run stopped, as its progress names it: in the stages open then, outermost first, each at the step
    under way (`in train a_lol, step 41 of 250 > generate, batch 1 of 2`), or after the last finished one; with
    train_policy's variables (lr) if it was training, and main's run directory if it had one."""
    frames = {f.f_code.co_name: f.f_locals for f, _ in traceback.walk_tb(error.__traceback__)
              if os.path.dirname(os.path.abspath(f.f_code.co_filename)) in (PROJECT, os.path.join(PROJECT, "tasks"))}
    if progress.OPEN:
        stage = "in " + " > ".join(s.position() for s in progress.OPEN)
    else:
        stage = f"after {progress.FINISHED[-1]}" if progress.FINISHED else "before the first stage"
    return stage, frames.get("train_policy", {}), frames.get("main", {}).get("out_dir")
