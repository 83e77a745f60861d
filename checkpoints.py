"""Checkpoints and resume: a training stage's log.jsonl, checkpoint/ (weights, optimiser state, step), best/ (the
best validated weights) and trackers; with --resume a stage continues from its last checkpoint."""
import errno
import json
import math
import os
import shutil

import torch
import transformers

from caches import file_sha256
from cli import disk_full
from distributed import barrier, is_main
from models import load_policy
from progress import Stage as Progress
from rundir import follow_umask, write_atomic
from tracking import Tracker


CHECKSUMS = "checksums.json"  # a checkpoint's last file: the sha256 of every other one


def tensor_bytes(x) -> int:
    """Bytes of the tensors in x, a tensor or nested dicts and lists of them (an optimiser's state)."""
    if torch.is_tensor(x):
        return x.numel() * x.element_size()
    values = x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else []
    return sum(tensor_bytes(v) for v in values)


def saved_bytes(model, state: dict) -> int:
    """About what save() writes: the weights save_pretrained keeps (a tied weight once; a LoRA adapter's alone) and
    the state."""
    if hasattr(model, "peft_config"):
        import peft

        weights = list(peft.get_peft_model_state_dict(model).values())
    else:
        weights = list({t.data_ptr(): t for t in model.state_dict().values()}.values())
    return tensor_bytes(weights) + tensor_bytes(state)


def verified(folder: str) -> bool:
    """Whether save() finished `folder`: its checksums file, written last, matches every file in it."""
    try:
        sums = json.load(open(os.path.join(folder, CHECKSUMS)))
        files = set(os.listdir(folder)) - {CHECKSUMS}
        return set(sums) == files and all(file_sha256(os.path.join(folder, f)) == sums[f] for f in files)
    except (OSError, ValueError):
        return False


def save(model, tok, ckpt: str, state: dict):
    """`save_pretrained` format (the whole model, loadable with from_pretrained; or a peft LoRA adapter) plus `state`
    (the optimiser's, for --resume; the validation reward, for best/) in trainer_state.pt, and CHECKSUMS written last:
    a checkpoint.tmp whose checksums verify is complete. The previous checkpoint is deleted only then, so a full disk
    (one line: the path, the space needed and free) loses nothing. Rank 0 writes; the others wait until it has."""
    if is_main():
        transformers.utils.logging.disable_progress_bar()  # a bar per saved file would drown alol's
        tmp = ckpt + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        needed = saved_bytes(model, state)
        if shutil.disk_usage(os.path.dirname(os.path.abspath(ckpt))).free < needed:
            raise disk_full(tmp, needed)
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            torch.save(state, os.path.join(tmp, "trainer_state.pt"))
            sums = {f: file_sha256(os.path.join(tmp, f)) for f in os.listdir(tmp)}
            with open(os.path.join(tmp, CHECKSUMS), "w") as f:
                f.write(json.dumps(sums))
            follow_umask(tmp)
        except Exception as e:  # torch and safetensors raise their own errors on a full disk, not always OSError
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(ckpt))).free  # with the partial files: ~0 if full
            shutil.rmtree(tmp, ignore_errors=True)
            if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < needed:
                raise disk_full(tmp, needed) from None
            raise
        shutil.rmtree(ckpt, ignore_errors=True)
        os.replace(tmp, ckpt)
    barrier()


def recover(ckpt: str, args):
    """With --resume, a save() stopped between deleting `ckpt` and renaming ckpt.tmp: the .tmp is the new checkpoint
    if its checksums verify (a partial one never counts)."""
    if args.resume and is_main() and not os.path.exists(ckpt) and verified(ckpt + ".tmp"):
        os.replace(ckpt + ".tmp", ckpt)
    barrier()


def load_weights(model, ckpt: str, args):
    """save()'s weights back into `model`: a LoRA adapter's into the peft model, or a whole model's."""
    if hasattr(model, "peft_config"):
        import peft

        peft.set_peft_model_state_dict(model, peft.utils.load_peft_weights(ckpt, device=args.device))
    else:
        model.load_state_dict(load_policy(ckpt, args).state_dict())


def resume(model, optim, sched, ckpt: str, log_path: str, args) -> int:
    """The step to continue from: 0 for a fresh stage; else the checkpoint's weights and optimiser state are loaded
    and log.jsonl is cut back to that step (rows written after it, or cut short by the kill, are dropped)."""
    recover(ckpt, args)
    if not (args.resume and os.path.exists(os.path.join(ckpt, "trainer_state.pt"))):
        return 0
    load_weights(model, ckpt, args)
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=True)
    optim.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    rows = [r for r in open(log_path) if r.endswith("\n")] if os.path.exists(log_path) else []
    write_atomic(log_path, "".join(r for r in rows if json.loads(r)["step"] <= state["step"]))
    return state["step"]


class Stage:
    """What one training stage writes in run_dir as it runs: a row per optimiser step in log.jsonl and the
    trackers, the validation reward every --eval-every steps with the best step's weights in best/ (kept across
    --resume), and checkpoint/ every --save-every steps and at the end. `model` is what is saved: the policy, or its
    LoRA adapter. The initial weights (step 0) are validated too and are a candidate: as the official HH trainer, a
    step is kept only if it beats them."""

    def __init__(self, model, tok, optim, sched, run_dir: str, args, n_steps: int, epochs: int, validate=None):
        self.model, self.tok, self.optim, self.sched, self.args = model, tok, optim, sched, args
        self.run_dir, self.n_steps, self.validate = run_dir, n_steps, validate
        self.ckpt, self.best_dir = os.path.join(run_dir, "checkpoint"), os.path.join(run_dir, "best")
        log_path = os.path.join(run_dir, "log.jsonl")
        os.makedirs(run_dir, exist_ok=True)
        recover(self.best_dir, args)  # the selection is kept as the checkpoint is
        self.start = resume(model, optim, sched, self.ckpt, log_path, args)
        if validate is None or not args.eval_every:
            self.every = 0
        elif args.eval_every < 1:  # a share of an epoch
            self.every = max(1, round(args.eval_every * n_steps / epochs))
        else:
            self.every = int(args.eval_every)
        best_path = os.path.join(self.best_dir, "trainer_state.pt")
        resumed_best = self.start and os.path.exists(best_path)
        self.best = torch.load(best_path, weights_only=True) if resumed_best else {"val_reward": -math.inf}
        self.tracker = Tracker(args, run_dir, self.start)
        self.log = open(log_path if is_main() else os.devnull, "a" if self.start else "w")
        if self.every and not self.start:
            self.write(self.validated(0, model))

    def validated(self, done: int, policy) -> dict:
        """The validation row after `done` optimiser steps; the weights saved in best/ if they beat the best so far."""
        row = {"step": done, "val_reward": self.validate(policy)}
        policy.train()
        if row["val_reward"] > self.best["val_reward"]:
            self.best = row
            save(self.model, self.tok, self.best_dir, self.best)
        return row

    def write(self, row: dict):
        self.log.write(json.dumps(row) + "\n")
        self.log.flush()  # every row: `tail -f log.jsonl` follows the run
        self.tracker.log(row)

    def steps(self):
        """The optimiser steps still to run, shown as `train <stage>` (`train reference`, `train a_lol`, as the
        folders): a bar on a terminal, status lines in a log (progress.py)."""
        self.bar = Progress(range(self.start, self.n_steps), f"train {os.path.basename(self.run_dir)}", self.n_steps,
                            self.start)
        return self.bar

    def record(self, step: int, row: dict, policy):
        """After optimiser step `step` (from 0): its row, the validation reward when due, the checkpoint when due."""
        shown = {"loss": "loss", "ratio": "ratio", "clip_frac": "clip", "adv": "adv", "pair_acc": "pairs",
                 "margin": "margin"}
        self.bar.set_postfix(**{name: f"{row[k]:.3f}" for k, name in shown.items() if k in row})  # this method's
        done = step + 1
        self.write(row)
        if self.every and (done % self.every == 0 or done == self.n_steps):
            self.write(self.validated(done, policy))
        if done % self.args.save_every == 0 or done == self.n_steps:
            save(self.model, self.tok, self.ckpt, {"optimizer": self.optim.state_dict(),
                                                   "scheduler": self.sched.state_dict(), "step": done})

    def finish(self, policy):
        """The best validated weights loaded back (with --eval-every); a LoRA adapter merged into `policy`, and the
        merged model saved in run_dir/model for from_pretrained. Returns {step, val_reward} of the kept step, or
        None."""
        self.log.close()
        self.tracker.close()
        if self.every:
            load_weights(self.model, self.best_dir, self.args)
        if self.model is not policy:  # a LoRA adapter: fold it into the weights
            self.model.merge_and_unload()
            save(policy, self.tok, os.path.join(self.run_dir, "model"), {})
        policy.eval()
        return self.best if self.every else None
