"""Tasks: one module each, so adding a task is adding a file here and its name to NAMES. A task module has

    PRESET                       settings that replace Args' defaults for this task (`python alol.py --task NAME`)
    load(args, reward_fn=None)   -> ({"train", "val", "test": [records]}, reward_fn): the task's data, scored, and its
                                 reward function (or `reward_fn`, from --reward-fn, for both); records are
                                 {"prompt", "response", "rewards": {component: float in [0, 1]}}, test records may
                                 carry a `subset` label for a per-subset table
    reward(args, references)     -> the task's reward function for other data (--train-file), given its responses
    data_files(args)             -> the files the task reads, whose contents a --resume must find unchanged

reward_fn(prompts, responses) -> {component: tensor of len(prompts) values in [0, 1]}; R is their sum.
`jsonl` is not a task: it reads your own data (--train-file, --val-file, --test-file) for any task's reward.
"""
import importlib

NAMES = ("toy", "reddit", "hh", "comet", "wow", "faithdial", "faithdial_wow")


def get(name: str):
    return importlib.import_module(f"tasks.{name}")
