"""Trackers, curves and the report: the settings printed, every training row to TensorBoard, W&B or trackio;
curves.png; results.json, results.md and results.png."""
import dataclasses
import importlib
import itertools
import json
import os
import textwrap

import torch

from distributed import is_main, world
from rundir import write_atomic

# The results table's own columns besides one per reward component: a component may not be named like one of them
# (two `length` columns), nor `reward` beside other components (the key of their sum R). clashing_names says which.
TABLE_COLUMNS = ("", "reward (sampled)", "reward (greedy)", "distinct-1", "distinct-2", "length")


def clashing_names(components) -> list:
    """The reward component names that would clash with the table's columns or with R's key `reward`; [] if none.
    A lone `reward` is the single-reward form ({"reward": 0.7} in a JSONL row)."""
    return sorted(set(components) & (set(TABLE_COLUMNS) | ({"reward"} if len(components) > 1 else set())))


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


# curves.png: one panel per logged quantity that some stage has, each on its own scale. The loss is divided by each
# stage's first logged loss: the methods weight log-probs by 1, R or A+ (times a ratio), so their raw losses differ
# by orders of magnitude and one axis would flatten all but the largest; relative to its start each one's trend shows.
# Per-batch values are noisy: each line is their trailing mean over SMOOTH_SHARE of the stage's steps (the raw values
# are in log.jsonl and the trackers).
CURVES = {"loss": "loss / the stage's loss at its start", "ratio": "mean ratio pi/pi_ref (clipped)",
          "clip_frac": "share of the batch clipped",
          "adv": "mean A+ of the batch\n(equal where methods draw the same batches)",
          "pair_acc": "pairs the policy ranks as the rewards (dpo, pro)",
          "val_reward": "validation reward (--eval-every)"}
SMOOTH_SHARE = 0.05
LINE_STYLES = ("-", "--", "-.", ":")  # with the colours: lines that coincide (the same batches) both stay visible


def line_style(i: int) -> dict:
    """Stage i's colour and dash pattern: both cycle (10 colours, 4 patterns), so the first 20 stages each differ
    from every other, and neighbours in both. Each is drawn thinner than the one before: where two coincide (a_lol_kl
    with a small beta on a_lol_ref_free), the earlier one's edges still show around the later one."""
    import matplotlib

    return {"color": matplotlib.colormaps["tab10"](i % 10), "linestyle": LINE_STYLES[i % len(LINE_STYLES)],
            "linewidth": max(0.8, 3.0 - 0.22 * i)}


def trailing_mean(values: list) -> list:
    """Each value's mean with the ones before it, over a window of SMOOTH_SHARE of them (fewer at the start)."""
    w, sums = max(1, round(SMOOTH_SHARE * len(values))), [0, *itertools.accumulate(values)]
    return [(sums[i + 1] - sums[max(0, i + 1 - w)]) / min(i + 1, w) for i in range(len(values))]


def curves_figure(out_dir: str, stages: list, clip_eps):
    """The figure of curves.png: per optimiser step, one line per stage in each panel of CURVES that has data (the
    NLL reference stage logs no ratio and no advantage; the validation reward needs --eval-every); None without data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = {}  # quantity -> [(stage, steps, values)]
    for stage in stages:
        log = os.path.join(out_dir, stage, "log.jsonl")
        rows = [json.loads(line) for line in open(log)] if os.path.exists(log) else []  # none: --ref-model given
        for key in CURVES:
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points and not (stage == "reference" and key in ("ratio", "clip_frac", "adv")):
                steps, values = zip(*points)
                values = values if key == "val_reward" else trailing_mean(values)
                if key == "loss":
                    values = [v / (abs(values[0]) or 1.0) for v in values]
                lines.setdefault(key, []).append((stage, steps, values))
    panels = [key for key in CURVES if key in lines]
    if not panels:  # no stage has logged a step yet
        return None
    cols = 3 if len(panels) > 4 else min(len(panels), 2)
    rows = -(-len(panels) // cols)
    legend_cell = rows * cols > len(panels)  # a free cell takes the legend; else it goes right of the panels
    fig, grid = plt.subplots(rows, cols, figsize=(5 * cols + (0 if legend_cell else 2.2), 3.8 * rows), squeeze=False)
    for ax, key in zip(grid.flat, panels):
        for stage, steps, values in lines[key]:
            ax.plot(steps, values, label=stage, marker="o" if key == "val_reward" else None,
                    **line_style(stages.index(stage)))
        if key == "ratio" and clip_eps is not None:
            ax.axhspan(max(1 - clip_eps, 0), 1 + clip_eps, color="gray", alpha=0.15, label=f"clip band 1 ± {clip_eps}")
        ax.set_title(CURVES[key], fontsize=10)
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
    legend = {label: handle for ax in grid.flat[:len(panels)] for handle, label in zip(*ax.get_legend_handles_labels())}
    for ax in grid.flat[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"per optimiser step, trailing mean over {SMOOTH_SHARE:.0%} of each stage's steps", fontsize=10)
    if legend_cell:
        grid.flat[-1].legend(legend.values(), legend.keys(), loc="center", title="stage")
        fig.tight_layout()
    else:
        fig.tight_layout(rect=(0, 0, 1 - 2.2 / fig.get_figwidth(), 1))
        fig.legend(legend.values(), legend.keys(), loc="center right", title="stage")
    return fig


def write_curves(out_dir: str, stages: list, clip_eps):
    """curves.png (curves_figure), redrawn after each stage."""
    if not is_main():
        return
    import matplotlib.pyplot as plt

    fig = curves_figure(out_dir, stages, clip_eps)
    if fig is not None:
        fig.savefig(os.path.join(out_dir, "curves.png"), dpi=100)
        plt.close(fig)


def write_report(results: dict, advantage: torch.Tensor, out_dir: str) -> str:
    """results.json, results.md (the printed table, returned) and results.png (report_figure)."""
    rows = {"data": {**results["data"], "reward_sampled": results["data"]["reward"]}, "reference": results["reference"],
            **results["methods"]}
    comps = list(results["data"]["components"])
    columns = [*TABLE_COLUMNS[:3], *comps, *TABLE_COLUMNS[3:]]
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
    import matplotlib.pyplot as plt

    fig = report_figure(rows, advantage)
    fig.savefig(os.path.join(out_dir, "results.png"), dpi=110)
    plt.close(fig)
    return table


def report_figure(rows: dict, advantage: torch.Tensor):
    """The figure of results.png: the mean test reward per row of the table (sampled bars, greedy dots; one row per
    method, names on the y axis, so that any number of methods stays legible) and the histogram of the advantages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)[::-1]  # top to bottom in the table's order
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, max(4.2, 1.6 + 0.38 * len(names))),
                                      gridspec_kw={"width_ratios": [1.2, 1]})
    bars = left.barh(names, [rows[m]["reward_sampled"] for m in names], color="tab:blue")
    left.bar_label(bars, fmt="%.2f", label_type="center", color="white", fontsize=9)  # clear of the greedy dots
    decoded = [m for m in names if rows[m].get("reward_greedy") is not None]  # the data has no greedy decode
    left.plot([rows[m]["reward_greedy"] for m in decoded], decoded, "o", color="tab:orange")
    left.set(xlabel="mean test reward", title="reward of test generations: sampled (bars), greedy (dots)")
    left.set_xlim(0, 1.05 * max([b.get_width() for b in bars] + [rows[m]["reward_greedy"] for m in decoded]))
    right.hist(advantage.numpy(), bins=60, color="tab:gray")
    right.axvline(0, color="black")
    right.set(xlabel="A = R - V(x)", ylabel="training examples",
              title=f"advantages: {(advantage > 0).float().mean():.0%} positive (kept by A-LoL)")
    fig.tight_layout()
    return fig


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
