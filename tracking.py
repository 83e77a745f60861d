"""Trackers, curves and the report: the settings printed, every training row to TensorBoard, W&B or trackio;
curves.png; results.json, results.md and results.png."""
import dataclasses
import importlib
import json
import os
import textwrap

import torch

from distributed import is_main, world
from rundir import write_atomic


class Tracker:
    """--report-to: every row logged to log.jsonl also goes to each chosen tracker, one run per stage named
    <run directory>/<stage>, with the settings logged once. Imported only when chosen."""

    def __init__(self, args, run_dir: str, start: int):
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
    (the methods only: the NLL reference stage has no ratio and no advantage, dpo and pro neither), the share of
    pairs ranked right (dpo and pro), and the validation reward."""
    if not is_main():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {"loss": "loss", "ratio": "mean ratio pi/pi_ref (clipped)", "clip_frac": "share of the batch clipped",
              "adv": "mean A+ of the batch", "pair_acc": "pairs the policy ranks as the rewards (dpo, pro)",
              "val_reward": "validation reward (--eval-every)"}
    fig, grid = plt.subplots(2, 4, figsize=(20, 7.5))
    axes, key_ax = grid.flat[:6], grid.flat[6]  # the next cell holds one legend for every panel
    grid.flat[7].axis("off")
    for color, stage in enumerate(stages):
        log = os.path.join(out_dir, stage, "log.jsonl")
        rows = [json.loads(line) for line in open(log)] if os.path.exists(log) else []  # none: --ref-model given
        for ax, key in zip(axes, panels):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points and not (stage == "reference" and key in ("ratio", "clip_frac", "adv")):
                ax.plot(*zip(*points), color=f"C{color % 10}", linestyle="-" if color < 10 else "--", label=stage,
                        marker="o" if key == "val_reward" else None)  # ten colours, then dashed
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


def advantage_stats(advantage: torch.Tensor) -> dict:
    """Mean, spread, quantiles and the positive share of A = R - V(x) over the training data, for results.json."""
    q = torch.quantile(advantage, torch.tensor([0.1, 0.5, 0.9]))
    return {"mean": advantage.mean().item(), "std": advantage.std().item(), "min": advantage.min().item(),
            "p10": q[0].item(), "median": q[1].item(), "p90": q[2].item(), "max": advantage.max().item(),
            "frac_positive": (advantage > 0).float().mean().item()}


def print_settings(args, out_dir: str):
    """The resolved settings (what config.json keeps), the run directory and the global batch."""
    print(textwrap.fill("config: " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(args).items()), 120,
                        subsequent_indent="  "), f"\nrun directory: {out_dir}")
    print(f"global batch: {args.batch_size} sequences x {args.grad_accum} micro-batches x {world()[1]} processes = "
          f"{args.batch_size * args.grad_accum * world()[1]} per optimiser step")


def scored_by(reward_fn, test_reward_fn) -> dict:
    """Which model (or function) scored each group of figures, for results.json."""
    return {figures: getattr(fn, "model", getattr(fn, "__qualname__", repr(fn))) for figures, fn in
            (("train, validation, V(x)", reward_fn), ("test: data, reference, methods", test_reward_fn))}
