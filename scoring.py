"""Calling a reward function: its output checked, its examples shared out over processes, and splits scored in
place."""
import math

import torch

from cli import AlolError
from distributed import shard_map, world
from tracking import clashing_names


def score(reward_fn, prompts: list, responses: list) -> dict:
    """reward_fn(prompts, responses) -> {component: tensor in [0, 1]}, checked, plus their sum R under `reward`.
    One call (reward models load once), or one per process under torchrun, each on its share of the examples."""
    name = getattr(reward_fn, "__qualname__", repr(reward_fn))

    def call(pairs, position):
        n = len(pairs)
        try:
            out = reward_fn([p for p, _ in pairs], [r for _, r in pairs])
            components = {k: torch.as_tensor(v, dtype=torch.float).cpu() for k, v in out.items()} \
                if isinstance(out, dict) else {}
        except AlolError:
            raise
        except Exception as e:
            raise AlolError(f"reward function {name} failed on {n} examples: {type(e).__name__}: {e}") from None
        if not components or not all(isinstance(k, str) for k in components):
            raise AlolError(f"reward function {name} returned {str(out)[:80]}; expected {{name: {n} values in [0, 1]}}")
        if clashing_names(components):
            raise AlolError(f"reward function {name}: component {clashing_names(components)[0]!r} has the name of a "
                            "column of the results table or of the summed reward: rename it")
        for key, v in components.items():
            if v.shape != (n,) or not torch.isfinite(v).all() or v.min() < 0 or v.max() > 1:
                raise AlolError(f"reward function {name}: component {key!r} must be {n} finite values in [0, 1], got "
                                f"{str(v.tolist())[:80]}")
        return components

    shares = shard_map(call, list(zip(prompts, responses)), max(1, math.ceil(len(prompts) / world()[1])), "reward")
    components = {k: torch.cat([share[k] for share in shares]) for k in shares[0]}
    return {**components, "reward": sum(components.values())}


def add_rewards(splits: dict, reward_fn) -> dict:
    """Score every record that has no rewards yet in one call of reward_fn (its models load once) and store the
    components; records that come with theirs (COMET's stored critic scores) keep them."""
    records = [r for split in splits.values() for r in split if "rewards" not in r]
    if not records:  # nothing to score: preflight names the empty split
        return splits
    scores = score(reward_fn, [r["prompt"] for r in records], [r["response"] for r in records])
    columns = {k: v.tolist() for k, v in scores.items() if k != "reward"}
    for i, r in enumerate(records):
        r["rewards"] = {k: v[i] for k, v in columns.items()}
    return splits
