"""Watching and selecting: trackers receive exactly the rows of log.jsonl, --eval-every keeps the best validated
checkpoint (also across --resume), curves.png is drawn, and --reward-fn finds a module in the working directory."""
import importlib
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import alol
import models
import tasks.toy
from conftest import run_cli

ROOT = pathlib.Path(__file__).resolve().parent.parent


def tiny(tmp_path, *extra):
    return ["--device", "cpu", "--kernel", "torch", "--out-dir", str(tmp_path / "run"), "--cache-dir",
            str(tmp_path / "cache"), "--n-train", "96", "--n-val", "8", "--n-test", "4", "--value-samples", "1",
            "--value-epochs", "1", "--batch-size", "16", "--ref-epochs", "1", "--epochs", "1",
            "--eval-max-new-tokens", "4", *extra]


def test_tensorboard_scalars_equal_log_jsonl_and_curves_are_drawn(tmp_path):
    results = alol.main(alol.parse_args(tiny(tmp_path, "--algo", "a_lol", "--report-to", "tensorboard",
                                             "--eval-every", "0.5")))
    for stage in ("reference", "a_lol"):
        rows = [json.loads(line) for line in open(tmp_path / "run" / stage / "log.jsonl")]
        events = EventAccumulator(str(tmp_path / "run" / stage / "tensorboard")).Reload()
        logged = {key: [(e.step, e.value) for e in events.Scalars(key)] for key in events.Tags()["scalars"]}
        expected = {}
        for row in rows:
            for key, value in row.items():
                if key != "step":
                    expected.setdefault(key, []).append((row["step"], value))
        assert set(logged) == set(expected) >= {"loss", "ratio", "clip_frac", "adv", "lr", "grad_norm", "val_reward"}
        for key in expected:  # TensorBoard stores float32
            assert [s for s, _ in logged[key]] == [s for s, _ in expected[key]], key
            assert torch.allclose(torch.tensor([v for _, v in logged[key]]), torch.tensor([v for _, v in expected[key]]))
        assert "settings" in str(events.Tags())
    # 6 steps, every half epoch: validations of the initial weights and after steps 3 and 6; results.json names the
    # kept step
    assert [r["step"] for r in map(json.loads, open(tmp_path / "run" / "a_lol" / "log.jsonl")) if "val_reward" in r] == [0, 3, 6]
    assert results["methods"]["a_lol"]["selected"]["step"] in (0, 3, 6)
    curves = tmp_path / "run" / "curves.png"
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and curves.stat().st_size > 20_000


@pytest.mark.parametrize("kind", ["wandb", "trackio"])
def test_missing_tracker_package_is_one_clear_line(tmp_path, monkeypatch, capsys, kind):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == kind else real(name, *a))
    assert run_cli(tiny(tmp_path, "--report-to", f"tensorboard,{kind}")) == 1
    assert capsys.readouterr().err.strip() == f"error: --report-to {kind}: the {kind} package is not installed " \
                                              f"(pip install {kind})"
    assert not (tmp_path / "run").exists()


def test_eval_every_keeps_the_best_checkpoint_and_resume_keeps_it(tmp_path, monkeypatch):
    """Scripted validation rewards whose best is neither the initial weights (step 0, a candidate too), the first
    step nor the last: the kept weights are that step's, and a run killed after it and resumed keeps it. When no
    step beats the initial weights, they are the result (the official HH trainer's bar)."""
    args = alol.parse_args(tiny(tmp_path, "--eval-every", "1", "--save-every", "2", "--report-to", "none"))
    splits, _ = tasks.toy.load(args)
    tok = models.bpe_tokenizer(splits["train"])
    data = alol.encode(splits["train"], tok, args)
    scripted = {0: 0.25, 1: 0.2, 2: 0.3, 3: 0.9, 4: 0.4, 5: 0.5, 6: 0.1}  # validation reward after each step
    weights_at = {}

    def validate(policy):
        step = len(weights_at)
        weights_at[step] = {k: v.clone() for k, v in policy.state_dict().items()}
        return scripted[step]

    torch.manual_seed(0)
    policy = alol.disable_dropout(models.tiny_gpt2(tok, args))
    init = {k: v.clone() for k, v in policy.state_dict().items()}
    best = alol.train_policy(policy, tok, data, "nll", str(tmp_path / "full"), args, 1, 1e-3, validate=validate)
    assert best == {"step": 3, "val_reward": 0.9}
    logged = [json.loads(line) for line in open(tmp_path / "full" / "log.jsonl")]
    assert [r["val_reward"] for r in logged if "val_reward" in r] == [scripted[s] for s in range(7)]
    for name, value in weights_at[0].items():
        assert torch.equal(value, init[name]), name
    for name, value in policy.state_dict().items():  # the weights handed back are step 3's, not step 6's
        assert torch.equal(value, weights_at[3][name]), name
    assert not all(torch.equal(v, weights_at[6][k]) for k, v in policy.state_dict().items())

    weights_at.clear()
    real = alol.train_step

    def killed_at_step_five(*a, **kw):
        if len(weights_at) == 5:  # steps 0 to 4 validated
            raise KeyboardInterrupt
        return real(*a, **kw)

    policy.load_state_dict(init)
    monkeypatch.setattr(alol, "train_step", killed_at_step_five)
    with pytest.raises(KeyboardInterrupt):
        alol.train_policy(policy, tok, data, "nll", str(tmp_path / "cut"), args, 1, 1e-3, validate=validate)
    monkeypatch.setattr(alol, "train_step", real)
    policy.load_state_dict(init)
    resumed = dataclasses.replace(args, resume=True)
    best = alol.train_policy(policy, tok, data, "nll", str(tmp_path / "cut"), resumed, 1, 1e-3, validate=validate)
    assert best == {"step": 3, "val_reward": 0.9}  # found before the kill, kept by the resumed run
    for name, value in policy.state_dict().items():
        assert torch.equal(value, weights_at[3][name]), name

    weights_at.clear()
    scripted[0] = 0.95  # nothing beats the initial weights
    policy.load_state_dict(init)
    best = alol.train_policy(policy, tok, data, "nll", str(tmp_path / "init"), args, 1, 1e-3, validate=validate)
    assert best == {"step": 0, "val_reward": 0.95} and len(weights_at) == 7
    for name, value in policy.state_dict().items():
        assert torch.equal(value, init[name]), name


def test_reward_fn_module_in_the_working_directory(tmp_path):
    """A user runs `python /path/to/alol.py --reward-fn my_rewards:score` next to their my_rewards.py."""
    (tmp_path / "my_rewards.py").write_text("def score(prompts, responses):\n    raise RuntimeError('found in cwd')\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "alol.py"), *tiny(tmp_path, "--reward-fn", "my_rewards:score")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert re.fullmatch(r"error: reward function score failed on \d+ examples: RuntimeError: found in cwd",
                        done.stderr.strip().splitlines()[-1])
