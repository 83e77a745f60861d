"""The command line: flags built from the settings, every value checked before anything runs (exit 2), and a run's
one-line errors (exit 1) and interruption (Ctrl-C exit 130, SIGTERM exit 143)."""
import argparse
import dataclasses
import errno
import importlib.util
import math
import os
import re
import shlex
import shutil
import signal
import sys
import traceback

import torch
import torch.distributed as dist

import progress
import tasks

PROJECT = os.path.dirname(os.path.abspath(__file__))


class AlolError(Exception):
    """A user-facing error: printed as one line, no traceback."""


def opt(default, help: str, choices=None):
    """A setting: its default, its --help line and, if given, the values it may take."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


class DiskFull(AlolError):
    """No space left for a file of the run: printed with the command that resumes it once space is freed."""


def free_mib(path: str) -> str:
    """The free space of the filesystem that holds `path` (or would)."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    return f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB are free"


def disk_full(path: str, needed: int) -> DiskFull:
    """The one-line error for `path`, which needed `needed` bytes, with what its filesystem has free."""
    return DiskFull(f"disk full: writing {path} needs about {needed / 2**20:.1f} MiB, {free_mib(path)}")


def parse(settings, groups: dict, algos: list, description: str, argv=None):
    """`settings` (the Args dataclass), extended with every task's own SETTINGS, from the command line: one flag per
    field, in argparse groups opening at the fields named in `groups` (a task's settings: a group of their own),
    with the chosen task's PRESET as the defaults (so --help shows them)."""
    def optional_float(s):
        return None if s.lower() == "none" else float(s)

    owner = {}  # setting -> the first task that declares it (tasks may share one, e.g. a classifier's path)
    for name in tasks.NAMES:
        for key, f in tasks.get(name).SETTINGS.items():
            owner.setdefault(key, (name, f))
    settings = dataclasses.make_dataclass(settings.__name__, [
        (key, type(f.default), opt(f.default, f.metadata["help"], f.metadata["choices"]))
        for key, (_, f) in owner.items()], bases=(settings,))
    first = {}  # task -> its first setting, where its --help group opens
    for key, (name, _) in owner.items():
        first.setdefault(name, key)
    groups = {**groups, **{key: f"task {name}" for name, key in first.items()}}
    p = argparse.ArgumentParser(description=description)
    group = p
    for f in dataclasses.fields(settings):
        group = p.add_argument_group(groups[f.name]) if f.name in groups else group
        flag, kind = "--" + f.name.replace("_", "-"), type(f.default)
        # argparse formats help with %: a literal one ("~30% slower") must be doubled
        help = f.metadata["help"].replace("%", "%%") + ("" if f.default == "" else " (default: %(default)s)")
        choices = list(tasks.NAMES) if f.name == "task" else f.metadata["choices"]
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help)
        else:
            group.add_argument(flag, type=optional_float if f.name == "clip_eps" else kind, default=f.default,
                               help=help, choices=choices)
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
    positive = ("lr", "ref_lr", "value_lr", "max_grad_norm", "eval_repetition_penalty", "lora_alpha", "dpo_beta",
                "pro_temperature", "adam_eps")
    non_negative = ("weight_decay", "kl_beta", "lora_dropout", "lora_r", "pro_sft_weight")  # lora_dropout < 1 below
    for k in positive + non_negative:  # a negative clip norm or decay silently ascends the loss; NaN spreads
        value = getattr(args, k)
        if not math.isfinite(value) or value < 0 or (value == 0 and k in positive):
            return f"--{k.replace('_', '-')} must be a finite number {'> 0' if k in positive else '>= 0'}"
    if args.lora_dropout >= 1:  # p = 1 zeroes every adapter input: nothing would train
        return "--lora-dropout must be in [0, 1)"
    if set(args.report_to.split(",")) - {"none", "tensorboard", "wandb", "trackio"}:
        return f"--report-to {args.report_to!r}: a comma list of tensorboard, wandb, trackio, or none"
    if not 0 <= args.eval_every < math.inf or (args.eval_every > 1 and args.eval_every % 1):
        return "--eval-every must be a whole number of steps, a share of an epoch below 1, or 0"
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        return f"--device {args.device!r}: choose auto, cpu, cuda or cuda:N"
    if args.device.startswith("cuda") and int(args.device.partition(":")[2] or 0) >= torch.cuda.device_count():
        return f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    if args.kernel == "triton" and (importlib.util.find_spec("triton") is None or
                                    not (cuda or os.environ.get("TRITON_INTERPRET") == "1")):
        return "--kernel triton needs CUDA and the triton package: choose --kernel torch or auto"
    sizes = ["epochs", "ref_epochs", "batch_size", "grad_accum", "value_samples", "n_val", "n_test", "max_prompt_len",
             "max_response_len", "save_every", "eval_max_new_tokens", "eval_num_beams", "eval_batch_size"]
    too_small = [k for k in sizes + ["n_train"] * (args.task == "toy") if getattr(args, k) < 1]
    if too_small:
        return f"--{too_small[0].replace('_', '-')} must be at least 1"
    files = [args.train_file, args.val_file, args.test_file]
    if any(files) and not all(files):
        return "--train-file, --val-file and --test-file go together"
    return ""


class Terminated(KeyboardInterrupt):
    """SIGTERM, what schedulers and torchrun send before they kill a job: raised where the run is, as Ctrl-C is."""


STOPPING = []  # the error the run is stopping on: from then on a SIGTERM only records itself (TERMINATED)
TERMINATED = []


def terminate(signum, frame):
    TERMINATED.append(signum)
    if not STOPPING:
        raise Terminated


def run(main, parse_args, argv: list) -> int:
    """main(parse_args(argv)) with the errors a user meets as one line: a bad input, a full disk or non-finite
    training (exit 1); Ctrl-C (exit 130) or SIGTERM (exit 143) with the stage, the step and the command that resumes
    the run; under torchrun, a process that died, named by its rank, with the same command (exit 1)."""
    import distributed  # here: they import this module
    import rundir

    progress.OPEN.clear()  # stages of an earlier run in this process (tests) are not this one's
    progress.FINISHED.clear()
    STOPPING.clear()
    TERMINATED.clear()
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        try:
            main(parse_args(argv))
            if dist.is_initialized():
                dist.destroy_process_group()
            return 0
        except BaseException as e:
            STOPPING.append(e)
            raise
    except AlolError as e:
        print(f"error: {e}{free_then(e, argv) if isinstance(e, DiskFull) else ''}", file=sys.stderr)
        return 1
    except FloatingPointError as e:  # raised by train_step before the update: nothing non-finite was saved
        stage, training, _ = where(e)
        print(f"error: non-finite values {stage} ({e}); stopped before updating or saving the weights. Try a lower "
              f"learning rate (now {training['lr']}) or --max-grad-norm.", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        if where(e)[2] is None and e.__context__ is not None and where(e.__context__)[2]:
            e = e.__context__  # a SIGTERM raised here, as another error was caught: the run stopped where that was
        code = 143 if TERMINATED else 130
        if distributed.is_main():  # every process got the signal: one line
            print(f"\n{'terminated (SIGTERM)' if TERMINATED else 'interrupted'} {stopped(e, argv)}", file=sys.stderr)
        return code
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        path = e.filename or where(e)[2] or os.getcwd()  # a write() names no file: the run directory
        print(f"error: disk full: cannot write {path} ({free_mib(path)}){free_then(e, argv)}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # gloo and NCCL raise RuntimeErrors when a peer process is gone
        if not dist.is_initialized():
            raise
        if TERMINATED:  # a peer stopped on the same SIGTERM first
            if distributed.is_main():
                print(f"\nterminated (SIGTERM) {stopped(e, argv)}", file=sys.stderr)
            return 143
        dead = distributed.dead_ranks()
        if not dead and not re.search(r"gloo|nccl|connection|peer|timed? ?out", str(e), re.I):
            raise  # not a lost process: a bug, with its traceback
        if distributed.world()[0] == min(set(range(distributed.world()[1])) - set(dead)):  # one survivor prints
            who = f"the process of rank {', '.join(map(str, dead))}" if dead else "a process on another node"
            why = re.sub(r"^\[[^]]*\] *", "", (str(e).strip() or type(e).__name__).splitlines()[-1]).partition(". ")[0]
            print(f"\nerror: {who} died ({why[:100]}); stopped {stopped(e, argv)}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        rundir.unlock()


def free_then(error: BaseException, argv: list) -> str:
    """What to do after a full disk: free space, then resume the run, or run it again if it wrote nothing yet."""
    hint = stopped(error, argv).partition("; ")[2]
    return f"; free space, then {hint}" if hint.startswith("to continue") else "; free space and run it again"


def stopped(error: BaseException, argv: list) -> str:
    """'<where>; to continue: <the command that resumes the run>' for a run stopped by `error`."""
    stage, _, out_dir = where(error)
    again = [a for a in argv if a not in ("--resume", "--overwrite")]
    if out_dir and "--out-dir" not in again:
        again += ["--out-dir", out_dir]
    size = dist.get_world_size() if dist.is_initialized() else 1
    launcher = "python " if size == 1 else f"torchrun --standalone --nproc_per_node {size} " \
        if os.environ.get("LOCAL_WORLD_SIZE") == str(size) else "torchrun <the same options> "
    hint = f"to continue: {launcher}{sys.argv[0]} {shlex.join(again + ['--resume'])}" if out_dir else \
        "nothing was written yet"
    return f"{stage}; {hint}"


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
