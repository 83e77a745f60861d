"""Tasks: one module each, so adding a task is adding a file here and its name to NAMES. A task module has

    PRESET                       settings that replace Args' defaults for this task (`python alol.py --task NAME`)
    SETTINGS                     the task's own settings, {name: cli.opt(default, help)}: flags of every run, in a
                                 --help group of the task's
    load(args, reward_fn=None)   -> ({"train", "val", "test": [records]}, reward_fn): the task's data, scored, and its
                                 reward function (or `reward_fn`, from --reward-fn, for both); records are
                                 {"prompt", "response", "rewards": {component: float in [0, 1]}}, test records may
                                 carry a `subset` label for a per-subset table, and training records of paired data a
                                 `rejected`: {"response", "rewards"}, the other reply to the same prompt (the less
                                 preferred one) with its reward components (HH), for preference losses
    reward(args, references)     -> the task's reward function for other data (--train-file), given its responses
    data_files(args)             -> the files the task reads, whose contents a --resume must find unchanged

and optionally

    postprocess(text)            -> a decoded reply as the task's reward reads it (default: str.strip); generate()
                                 applies it to every decode (HH: the official cut at the next turn marker)
    test_reward(args, test_records, reward_fn) -> the function that scores the test set, when it is not the
                                 training reward (HH: the paper's 6.9 B reward model); results.json names both

reward_fn(prompts, responses) -> {component: tensor of len(prompts) values in [0, 1]}; R is their sum.
`jsonl` is not a task: it reads your own data (--train-file, --val-file, --test-file) for any task's reward.
"""
import importlib

NAMES = ("toy", "reddit", "hh", "comet", "wow", "faithdial", "faithdial_wow")


def get(name: str):
    return importlib.import_module(f"tasks.{name}")


def load(args) -> tuple:
    """(task module, scored splits, reward function, test reward function): the task's own data, or your own JSONL
    files scored by their `reward` field and evaluated with the task's reward function; --reward-fn replaces it."""
    from tasks import jsonl

    task = get(args.task)
    reward_fn = jsonl.reward_function(args.reward_fn) if args.reward_fn else None
    if args.train_file:
        splits = jsonl.load(args)
        reward_fn = reward_fn or task.reward(args, [r["response"] for r in splits["train"]])
    else:
        splits, reward_fn = task.load(args, reward_fn)
    test_fn = task.test_reward(args, splits["test"], reward_fn) if hasattr(task, "test_reward") else reward_fn
    return task, splits, reward_fn, test_fn
