"""What a new user meets: progress in a log file, log.jsonl that `tail -f` follows, files a group can read, names
that say what they are, no third-party warnings, README versions that are the installed ones, figures that stay
legible with many methods."""
import io
import itertools
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import warnings

import pytest
import torch
import transformers

import alol
import checks
import models
import progress
import scoring
import tasks.toy
import tracking
from conftest import run_cli

ROOT = pathlib.Path(__file__).resolve().parent.parent


def tiny(tmp_path, *extra):
    return ["--device", "cpu", "--kernel", "torch", "--cache-dir", str(tmp_path / "cache"), "--n-train", "96",
            "--n-val", "8", "--n-test", "4", "--value-samples", "1", "--value-epochs", "1", "--batch-size", "16",
            "--ref-epochs", "1", "--epochs", "1", "--eval-max-new-tokens", "4", "--report-to", "none", *extra]


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory):
    """`python alol.py` on your own data files, with stderr a pipe (as under nohup or CI), umask 002 and no
    --out-dir: (its stdout, its stderr, the working directory)."""
    tmp = tmp_path_factory.mktemp("piped")
    splits, _ = tasks.toy.load(alol.parse_args(["--n-train", "96", "--n-val", "8", "--n-test", "4"]))
    for split, records in splits.items():
        rows = [{k: r[k] for k in ("prompt", "response", "rewards")} for r in records]
        (tmp / f"pets.{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "1"}
    files = [arg for s in ("train", "val", "test") for arg in (f"--{s}-file", str(tmp / f"pets.{s}.jsonl"))]
    done = subprocess.run([sys.executable, str(ROOT / "alol.py"), *tiny(tmp, "--algo", "a_lol", *files)], cwd=tmp,
                          env=env, capture_output=True, text=True, timeout=600,
                          preexec_fn=lambda: os.umask(0o002))
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr, tmp


def test_progress_lines_with_a_pipe_as_stderr(piped_run):
    """No bars (nothing on stderr), and each stage says on stdout when it starts and when it is done, in order."""
    out, err, _ = piped_run
    assert err == ""
    lines = out.splitlines()
    stamp = r"\[\d\d:\d\d:\d\d\] "
    for stage, steps in (("train reference", 6), ("train a_lol", None)):
        start = [i for i, line in enumerate(lines) if re.fullmatch(f"{stamp}{stage}: start, \\d+ steps", line)]
        done = [i for i, line in enumerate(lines) if re.fullmatch(
            f"{stamp}{stage}: done, \\d+ steps in \\d+ s, loss [-0-9.]+, ratio [0-9.]+, clip [0-9.]+, adv [0-9.]+",
            line)]
        assert len(start) == len(done) == 1 and start[0] < done[0], (stage, err)
        if steps:
            assert lines[start[0]].endswith(f"start, {steps} steps")


def test_a_status_line_about_every_30_seconds_with_the_time_left(monkeypatch, capsys):
    """A stage of 10 steps of 10 s each (a fake clock): lines after steps 3, 6 and 9, with the last step's
    statistics and the time left at the rate so far."""
    clock = itertools.count(0, 10)  # one reading at the start, then one per step
    monkeypatch.setattr(progress.time, "monotonic", lambda: float(next(clock)))
    stage = progress.Stage(range(10), "train a_lol")
    for step in stage:
        stage.set_postfix(loss=f"{step:.3f}")
    for _ in progress.Stage(range(2), "value head", unit="epoch"):
        pass
    for _ in progress.Stage(range(3), "generate", unit="batch"):
        pass
    lines = [line.split("] ", 1)[1] for line in capsys.readouterr().out.splitlines()]
    assert lines == ["train a_lol: start, 10 steps",
                     "train a_lol: step 3 of 10, loss 2.000; 30 s so far, about 1 min 10 s left",
                     "train a_lol: step 6 of 10, loss 5.000; 1 min so far, about 40 s left",
                     "train a_lol: step 9 of 10, loss 8.000; 1 min 30 s so far, about 10 s left",
                     "train a_lol: done, 10 steps in 1 min 40 s, loss 9.000",
                     "value head: start, 2 epochs", "value head: done, 2 epochs in 20 s",
                     "generate: start, 3 batches", "generate: done, 3 batches in 30 s"]


def test_a_terminal_gets_the_bar_and_no_lines(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    for _ in progress.Stage(range(3), "train a_lol"):
        pass
    assert "\r" in sys.stderr.getvalue() and "3/3" in sys.stderr.getvalue() and sys.stdout.getvalue() == ""


def test_log_jsonl_is_on_disk_after_every_step(tmp_path, monkeypatch):
    """`tail -f log.jsonl` follows the run: before step k, the k-1 rows of the steps before it are in the file (not
    only at the checkpoints, every --save-every steps)."""
    args = alol.parse_args(tiny(tmp_path, "--save-every", "100"))
    splits, _ = tasks.toy.load(args)
    tok = models.bpe_tokenizer(splits["train"])
    torch.manual_seed(0)
    policy = alol.disable_dropout(models.tiny_gpt2(tok, args))
    log, rows_seen, real = tmp_path / "stage" / "log.jsonl", [], alol.train_step

    def step(*a, **kw):
        rows_seen.append(len(log.read_text().splitlines()))
        return real(*a, **kw)

    monkeypatch.setattr(alol, "train_step", step)
    alol.train_policy(policy, tok, alol.encode(splits["train"], tok, args), "nll", str(tmp_path / "stage"), args, 1,
                      1e-3)
    assert rows_seen == [0, 1, 2, 3, 4, 5]


def test_written_files_follow_the_umask(piped_run):
    """Under umask 002 every file of the run and of the cache is rw-rw-r-- (safetensors alone writes 0600)."""
    _, _, tmp = piped_run
    modes = {str(p.relative_to(tmp)): oct(p.stat().st_mode & 0o777) for folder in ("runs", "cache")
             for p in (tmp / folder).rglob("*") if p.is_file()}
    assert any(name.endswith("model.safetensors") for name in modes)
    assert {name: mode for name, mode in modes.items() if mode != oct(0o664)} == {}


def test_run_on_your_own_data_is_named_after_the_data_file(piped_run):
    _, _, tmp = piped_run
    (run,) = os.listdir(tmp / "runs")
    assert re.fullmatch(r"pets-seed0-\d{8}-\d{6}", run)


def test_ctrl_c_names_the_stage_and_the_step(tmp_path, monkeypatch, capsys):
    """Interrupted while generating for the reference's evaluation: the message names that generation and its
    batch, not a function of the code."""
    argv = tiny(tmp_path, "--out-dir", str(tmp_path / "run"), "--algo", "nll", "--eval-batch-size", "2")

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.GenerationMixin, "generate", interrupted)
    assert run_cli(argv) == 130
    err = capsys.readouterr().err.strip()
    assert err == (f"interrupted in generate, batch 1 of 2; to continue: python {sys.argv[0]} "
                   f"{shlex.join(argv + ['--resume'])}")


@pytest.mark.parametrize("names", [["length", "fluency"], ["reward", "fluency"], ["distinct-1"], ["reward (greedy)"]])
def test_component_names_cannot_clash_with_the_table(tmp_path, names):
    """A reward function or a data file with such a component is refused in one line, before anything runs;
    `reward` alone is the single-reward form."""
    def reward_fn(prompts, responses):
        return {k: torch.full((len(responses),), 0.5) for k in names}

    with pytest.raises(scoring.AlolError, match=f"component '{re.escape(names[0])}' has the name of a column"):
        scoring.score(reward_fn, ["p"], ["r"])
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "p", "response": "r", "rewards": {k: 0.5 for k in names}}) + "\n")
    with pytest.raises(scoring.AlolError, match=f"{re.escape(str(path))}:1: reward component '.*' has the name"):
        checks.read_jsonl(str(path), "--train-file")


def test_the_table_has_no_two_columns_of_one_name():
    """Every name the checks let through gives a table whose header names each column once."""
    allowed = [["reward"], ["fluency", "safety"], ["length_penalty", "distinct"]]
    for names in allowed:
        assert tracking.clashing_names(names) == []
        header = [*tracking.TABLE_COLUMNS[:3], *names, *tracking.TABLE_COLUMNS[3:]]
        assert len(set(header)) == len(header)
    for column in tracking.TABLE_COLUMNS:
        assert tracking.clashing_names([column, "fluency"]) == [column]


def test_lora_on_gpt2_raises_no_third_party_warnings(tmp_path):
    """--lora-r on a GPT-2: peft's Conv1D fan_in_fan_out notice and transformers' is_gradient_checkpointing
    deprecation are filtered (models.for_training); any other warning still shows."""
    args = alol.parse_args(tiny(tmp_path, "--lora-r", "4"))
    splits, _ = tasks.toy.load(args)
    policy = models.tiny_gpt2(models.bpe_tokenizer(splits["train"]), args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        models.for_training(policy, args)
    assert [str(w.message) for w in caught] == []


def requirement_pins() -> dict:
    pins = {}
    for line in (ROOT / "requirements-dev.txt").read_text().splitlines():
        if m := re.match(r"([A-Za-z0-9_-]+)==([\d.]+)", line):
            pins[m[1].lower()] = m[2]
    return pins


def test_versions_the_docs_name_are_the_ones_the_requirements_install():
    """Every `torch X.Y.Z`, `triton X.Y[.Z]` or `numpy X.Y[.Z]` that README.md or tutorial.md names is (a prefix of)
    the version requirements-dev.txt pins; requirements.txt itself pins none of them."""
    pins = requirement_pins()
    assert {"torch", "triton", "numpy"} <= set(pins)
    named = [(doc, m[1].lower(), m[2]) for doc in ("README.md", "tutorial.md")
             for m in re.finditer(r"\b(torch|triton|numpy)[ =]=?(\d+\.\d+(?:\.\d+)?)\b", (ROOT / doc).read_text(),
                                  flags=re.I)]
    assert named, "the README names the versions it was measured with"
    wrong = [(doc, pkg, v) for doc, pkg, v in named if not (pins[pkg] + ".").startswith(v + ".")]
    assert wrong == []
    assert not re.search(r"^(torch|triton|numpy)\s*==", (ROOT / "requirements.txt").read_text(), flags=re.M | re.I)


def test_readme_hard_codes_no_test_count():
    """The number of tests changes with every commit: the README gives the command, not the count."""
    readme = (ROOT / "README.md").read_text()
    assert not re.search(r"\b\d+ (passed|tests pass)", readme)


@pytest.mark.parametrize("n", [10, 14])
def test_figures_stay_legible_with_many_methods(tmp_path, n):
    """With n methods: every stage's line differs from every other in colour or dash pattern, every panel has data,
    each loss starts at 1 on its own scale, and the method names of results.png do not overlap."""
    stages = ["reference"] + [f"method_with_a_long_name_{i}" for i in range(n)]
    for i, stage in enumerate(stages):
        (tmp_path / stage).mkdir()
        rows = [{"step": s, "loss": 10.0 ** (i % 4) * (2 - s / 20), "ratio": 1.0, "clip_frac": 0.0, "adv": 1.0}
                for s in range(1, 21)]
        (tmp_path / stage / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = tracking.curves_figure(str(tmp_path), stages, 0.9)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == [tracking.CURVES[k] for k in ("loss", "ratio", "clip_frac", "adv")]
    assert all(ax.lines for ax in panels)
    looks = [(tuple(line.get_color()), line.get_linestyle()) for line in panels[0].lines]
    assert len(set(looks)) == len(stages)
    assert all(line.get_ydata()[0] == 1.0 for line in panels[0].lines)
    results = {"data": {"reward_sampled": 2.0}, "reference": {"reward_sampled": 2.5, "reward_greedy": 3.0},
               **{s: {"reward_sampled": 3.0, "reward_greedy": 3.5} for s in stages[1:]}}
    fig = tracking.report_figure(results, torch.randn(100))
    fig.canvas.draw()
    labels = [t.get_window_extent() for t in fig.axes[0].get_yticklabels() if t.get_text()]
    assert len(labels) == n + 2
    assert not any(a.overlaps(b) for a, b in itertools.combinations(labels, 2))
