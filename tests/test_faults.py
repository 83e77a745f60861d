"""The fault battery: bad inputs and interruptions, each through `alol.cli` as a user meets them. Every case checks
the one-line message, the exit code, how far the run got (a bad input must fail before the reference stage) and
what is on disk afterwards (nothing lost, no half-written run, no stale cache used)."""
import gzip
import json
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

import alol
import caches
import checkpoints
import checks
import models
import reward_models
import rundir
import tasks.hh
import tasks.toy
from cli import AlolError
from conftest import run_cli

GOOD = {"prompt": "r/pets : any tips for cats ?", "response": "good luck !", "reward": 1.5}


class ReferenceStageReached(Exception):
    """Raised by the stubbed reference stage: the run got past every check."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny GPT-2 and its tokenizer saved as a Hugging Face model folder (config.json, weights, tokenizer)."""
    path = tmp_path_factory.mktemp("model") / "gpt2"
    args = alol.parse_args([])
    splits, _ = tasks.toy.load(alol.parse_args(["--n-train", "200"]))
    tok = models.bpe_tokenizer(splits["train"])
    torch.manual_seed(0)
    models.tiny_gpt2(tok, args).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def base(tmp_path, *extra):
    return ["--device", "cpu", "--kernel", "torch", "--out-dir", str(tmp_path / "run"), "--cache-dir",
            str(tmp_path / "cache"), "--n-train", "48", "--n-val", "8", "--n-test", "4", "--value-samples", "1",
            "--value-epochs", "1", "--batch-size", "16", "--ref-epochs", "1", "--epochs", "1",
            "--eval-max-new-tokens", "4", *extra]


def jsonl(tmp_path, name, rows, raw=None):
    path = tmp_path / name
    path.write_bytes(raw if raw is not None else "".join(
        (r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode())
    return str(path)


def data_flags(tmp_path, train_rows=None, raw=None):
    """--train-file, --val-file, --test-file; validation and test rows: the last training row on 3 prompts."""
    row = train_rows[-1] if train_rows and isinstance(train_rows[-1], dict) else GOOD
    other = jsonl(tmp_path, "other.jsonl", [{**row, "prompt": f"r/pets : any tips for {n} ?"}
                                           for n in ("cats", "dogs", "fish")])
    train = jsonl(tmp_path, "train.jsonl", train_rows or [GOOD] * 4, raw)
    return ["--train-file", train, "--val-file", other, "--test-file", other]


def run(argv, monkeypatch, capsys, stop_at_reference=True):
    """run_cli(argv) -> (exit code, stderr, stdout, whether the reference stage was reached)."""
    reached = []
    real = alol.train_policy

    def reference_stage(policy, tok, data, algo, *a, **kw):
        reached.append(algo)
        if stop_at_reference:
            raise ReferenceStageReached
        return real(policy, tok, data, algo, *a, **kw)

    monkeypatch.setattr(alol, "train_policy", reference_stage)
    try:
        code = run_cli(argv)
    except SystemExit as e:  # argparse: exit 2
        code = e.code
    except ReferenceStageReached:
        code = None
    out = capsys.readouterr()
    return code, out.err, out.out, bool(reached)


# ---- settings: refused by the argument parser (exit 2), before anything is read -------------------------------
@pytest.mark.parametrize("flags,message", [
    (["--max-grad-norm", "-1"], "--max-grad-norm must be a finite number > 0"),  # was: gradient ascent
    (["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number > 0"),  # was: NaN weights saved
    (["--clip-eps", "nan"], "--clip-eps must be a finite number > 0"),
    (["--lr", "-1"], "--lr must be a finite number > 0"),  # was: a traceback
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0"),
    (["--device", "tpu"], "--device 'tpu': choose auto, cpu, cuda or cuda:N"),
    (["--algo", "all,nll"], "--algo names each method once, or is `all` alone"),
    (["--algo", "nll,nll"], "--algo names each method once"),  # was: nll trained twice
])
def test_bad_settings(tmp_path, monkeypatch, capsys, flags, message):
    code, err, _, reached = run(base(tmp_path, *flags), monkeypatch, capsys)
    assert code == 2 and message in err and not reached
    assert not (tmp_path / "run").exists()


# ---- data read exactly as written: one line naming the file and line, before the reference stage --------------
@pytest.mark.parametrize("rows,raw,message", [
    ([json.dumps(GOOD) + " " + json.dumps(GOOD), GOOD], None, r"train\.jsonl:1: not valid JSON \(Extra data"),
    ([GOOD, {**GOOD, "reward": "0.5"}], None, r"train\.jsonl:2: reward 'reward' is not a finite number: '0\.5'"),
    ([GOOD, {**GOOD, "reward": True}], None, r"train\.jsonl:2: reward 'reward' is not a finite number: True"),
    ([{**GOOD, "reward": None, "rewards": {"a": 0.5, "b": 0.5}}, {**GOOD, "rewards": {"a": 0.5, "c": 0.5}}], None,
     r"train\.jsonl:2: reward components \['a', 'c'\] differ from the file's first row's \['a', 'b'\]"),
    ([GOOD, {**GOOD, "reward": -3}], None, r"train\.jsonl:2: reward -3 is outside \[0, 5\]"),
    ([GOOD, {**GOOD, "reward": 50}], None, r"train\.jsonl:2: reward 50 is outside \[0, 5\]"),
    (None, b'{"prompt": "caf\xe9", "response": "ok", "reward": 1}\n', r"train\.jsonl:1: not UTF-8 text \(byte 0xe9"),
    (None, b"", r"train\.jsonl: no examples"),  # was: "could not be read as JSONL (StopIteration: )"
])
def test_bad_data_is_named_by_file_and_line(tmp_path, monkeypatch, capsys, rows, raw, message):
    code, err, _, reached = run(base(tmp_path, *data_flags(tmp_path, rows, raw)), monkeypatch, capsys)
    assert code == 1 and re.search(message, err) and len(err.strip().splitlines()) == 1 and not reached
    assert not (tmp_path / "run").exists()


def test_gzipped_jsonl_is_read_as_written(tmp_path, monkeypatch, capsys):
    flags = data_flags(tmp_path, raw=gzip.compress(("\n".join(json.dumps({**GOOD, "reward": r}) for r in
                                                              (0.5, 2.0, 3.25)) + "\n").encode()))
    assert [r["rewards"]["reward"] for r in checks.read_jsonl(flags[1], "--train-file")] == [0.5, 2.0, 3.25]
    code, _, _, reached = run(base(tmp_path, *flags), monkeypatch, capsys)
    assert code is None and reached


# ---- the reward function, called on real examples before the reference stage ---------------------------------
REWARD_FNS = {
    "raises": "def score(p, r):\n    raise RuntimeError('model not found')\n",
    "empty": "def score(p, r):\n    return {}\n",
    "list": "def score(p, r):\n    return [0.5] * len(r)\n",
    "shape": "import torch\ndef score(p, r):\n    return {'a': torch.zeros(len(r) + 1)}\n",
    "range": "import torch\ndef score(p, r):\n    return {'a': torch.full((len(r),), 1.5)}\n",
    "nan": "import torch\ndef score(p, r):\n    return {'a': torch.full((len(r),), float('nan'))}\n",
}


@pytest.mark.parametrize("kind,message", [
    ("raises", r"reward function score failed on 3 examples: RuntimeError: model not found"),
    ("empty", r"reward function score returned \{\}; expected \{name: 3 values in \[0, 1\]\}"),
    ("list", r"reward function score returned \[0\.5, 0\.5, 0\.5\]"),
    ("shape", r"reward function score: component 'a' must be 3 finite values in \[0, 1\], got \[0\.0, 0\.0, 0\.0, 0\.0\]"),
    ("range", r"component 'a' must be 3 finite values in \[0, 1\], got \[1\.5"),
    ("nan", r"component 'a' must be 3 finite values in \[0, 1\], got \[nan"),
])
def test_bad_reward_function_fails_before_training(tmp_path, monkeypatch, capsys, kind, message):
    (tmp_path / f"rewards_{kind}.py").write_text(REWARD_FNS[kind])
    monkeypatch.syspath_prepend(str(tmp_path))
    flags = data_flags(tmp_path, [{**GOOD, "rewards": {"a": 0.5}}] * 4) + ["--reward-fn", f"rewards_{kind}:score"]
    code, err, _, reached = run(base(tmp_path, *flags), monkeypatch, capsys)
    assert code == 1 and re.search(message, err) and len(err.strip().splitlines()) == 1 and not reached
    assert not (tmp_path / "run").exists()


# ---- the model folder ------------------------------------------------------------------------------------------
def broken_model(kind, model_dir, tmp_path):
    path = tmp_path / kind
    if kind == "data folder":
        path.mkdir()
        (path / "train.jsonl").write_text(json.dumps(GOOD) + "\n")
    elif kind == "empty folder":
        path.mkdir()
    elif kind == "tokenizer only":
        transformers.AutoTokenizer.from_pretrained(model_dir).save_pretrained(path)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
        tok = transformers.AutoTokenizer.from_pretrained(model_dir)
        if kind == "vocabulary larger than the model":
            model.resize_token_embeddings(len(tok) - 10)
        model.save_pretrained(path)
        if kind == "no end-of-text token":
            tok.eos_token = None
        tok.save_pretrained(path)
        if kind == "corrupt weights":
            weights = path / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[:1000])
    return str(path)


@pytest.mark.parametrize("kind,message", [
    ("data folder", r"data folder: not a Hugging Face model folder \(no config\.json\)"),
    ("empty folder", r"empty folder: not a Hugging Face model folder \(no config\.json\)"),
    ("tokenizer only", r"tokenizer only: not a Hugging Face model folder \(no config\.json\)"),
    ("corrupt weights", r"cannot load '.*corrupt weights' with AutoModelForCausalLM: "),
    ("no end-of-text token", r"the tokenizer has no end-of-text token"),
    ("vocabulary larger than the model", r"the tokenizer has \d+ tokens, the model embeds only \d+"),
])
def test_bad_model_folder_fails_before_training(tmp_path, model_dir, monkeypatch, capsys, kind, message):
    flags = ["--model", broken_model(kind, model_dir, tmp_path)]
    code, err, _, reached = run(base(tmp_path, *flags), monkeypatch, capsys)
    assert code == 1 and re.search(message, err) and len(err.strip().splitlines()) == 1 and not reached
    assert not (tmp_path / "run").exists()


# ---- folders ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag,place,message", [
    ("--out-dir", "file", r"--out-dir .*: cannot write there \(Not a directory\)"),
    ("--out-dir", "/proc/alol-run", r"--out-dir /proc/alol-run: cannot write there"),  # read-only even for root
    ("--cache-dir", "file", r"--cache-dir .*: cannot write there \(Not a directory\)"),  # was: V(x) lost after it
    ("--cache-dir", "/proc/alol-cache", r"--cache-dir /proc/alol-cache: cannot write there"),
])
def test_unwritable_folders_fail_before_training(tmp_path, monkeypatch, capsys, flag, place, message):
    if place == "file":
        place = str(tmp_path / "a-file")
        (tmp_path / "a-file").write_text("not a folder")
    code, err, _, reached = run(base(tmp_path) + [flag, place], monkeypatch, capsys)
    assert code == 1 and re.search(message, err) and not reached


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_model_folder_as_out_dir_is_never_deleted(tmp_path, model_dir, monkeypatch, capsys, overwrite):
    """Every Hugging Face model folder holds a config.json: only alol's own marker makes a folder a run."""
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    code, err, _, reached = run(base(tmp_path) + ["--out-dir", str(model_dir)] + ["--overwrite"] * overwrite,
                                monkeypatch, capsys)
    assert code == 1 and "holds files that alol did not write" in err and "pass --overwrite" not in err
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before and not reached


# ---- resume checks content -------------------------------------------------------------------------------------
def test_resume_with_nothing_to_resume(tmp_path, monkeypatch, capsys):
    code, err, _, reached = run(base(tmp_path, "--resume"), monkeypatch, capsys)
    assert code == 1 and "holds no run to resume" in err and not reached and not (tmp_path / "run").exists()


@pytest.mark.parametrize("change,message", [
    ("data", r"differs in: .*train\.jsonl"),
    ("reward code", r"differs in: reward function code"),
])
def test_resume_after_data_or_reward_code_changed_is_refused(tmp_path, monkeypatch, capsys, change, message):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # the edited module is compiled anew
    (tmp_path / "my_reward.py").write_text("import torch\ndef score(p, r):\n    return {'a': torch.full((len(r),), 0.5)}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = [{**GOOD, "rewards": {"a": 0.5}}] * 4
    argv = base(tmp_path, *data_flags(tmp_path, rows), "--reward-fn", "my_reward:score")
    code, err, _, reached = run(argv, monkeypatch, capsys)
    assert reached, err  # the run starts: config.json records the fingerprints
    if change == "data":
        data_flags(tmp_path, rows[:3] + [{**GOOD, "rewards": {"a": 0.75}}])  # edited in place
    else:
        (tmp_path / "my_reward.py").write_text("import torch\ndef score(p, r):\n    return {'a': torch.full((len(r),), 0.25)}\n")
        monkeypatch.delitem(sys.modules, "my_reward")
    code, err, _, reached = run(argv + ["--resume"], monkeypatch, capsys)
    assert code == 1 and re.search(message, err) and not reached


# ---- numerics --------------------------------------------------------------------------------------------------
def test_non_finite_loss_stops_before_the_weights_are_saved(tmp_path, monkeypatch, capsys):
    code, err, _, reached = run(base(tmp_path, "--ref-lr", "1e30", "--save-every", "1"), monkeypatch, capsys,
                                stop_at_reference=False)
    assert code == 1 and re.search(r"non-finite values in train reference, step \d+ of 3 .*stopped before updating or "
                                   r"saving the weights\. Try a lower learning rate \(now 1e\+30\)", err)
    ckpt = tmp_path / "run" / "reference" / "checkpoint"
    if ckpt.exists():  # the steps before the first non-finite one were saved, and are finite
        weights = transformers.AutoModelForCausalLM.from_pretrained(ckpt).state_dict().values()
        assert all(torch.isfinite(w).all() for w in weights)


# ---- caches and checkpoints ------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "altered"])
def test_damaged_cache_is_reported_and_recomputed(tmp_path, monkeypatch, capsys, damage):
    argv = base(tmp_path, "--algo", "nll")
    assert run(argv, monkeypatch, capsys, stop_at_reference=False)[0] == 0
    (cache,) = (tmp_path / "cache").iterdir()
    fresh = torch.load(cache, weights_only=True)
    if damage == "truncated":
        cache.write_bytes(cache.read_bytes()[:500])
    else:  # bytes overwritten inside the stored V(x): the file still loads
        frozen = dict(fresh)
        frozen["value"] = torch.full_like(fresh["value"], -1000.0)
        torch.save(frozen, cache)
    code, err, out, _ = run(argv + ["--out-dir", str(tmp_path / "again")], monkeypatch, capsys, stop_at_reference=False)
    assert code == 0 and f"cache file {cache} is truncated or altered: computing it again" in out
    again = torch.load(cache, weights_only=True)
    assert torch.equal(again["value"], fresh["value"]) and torch.equal(again["ref_logp"], fresh["ref_logp"])


def write_many(path, text, n):
    for _ in range(n):
        rundir.write_atomic(path, text)


def test_two_processes_writing_one_cache_file_never_race(tmp_path):
    path = str(tmp_path / "shared.json")
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=write_many, args=(path, text, 300)) for text in ("a" * 5000, "b" * 5000)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert [w.exitcode for w in workers] == [0, 0] and open(path).read() in ("a" * 5000, "b" * 5000)
    assert os.listdir(tmp_path) == ["shared.json"]


def test_ctrl_c_says_how_to_resume_and_resume_finishes_a_complete_checkpoint_tmp(tmp_path, monkeypatch, capsys):
    """Ctrl-C: one line with the stage, the step and the command that resumes (exit 130). Then a kill between
    save_checkpoint's delete and its rename, which leaves only checkpoint.tmp: --resume uses it."""
    argv = base(tmp_path, "--algo", "nll", "--n-train", "96", "--save-every", "2")  # 6 reference steps
    real, reference_steps = alol.train_step, []

    def ctrl_c_at_fourth_reference_step(*a, **kw):
        reference_steps.append(a[6] is None)  # frozen=None: the reference stage
        if len(reference_steps) == 4:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(alol, "train_step", ctrl_c_at_fourth_reference_step)
    code, err, _, _ = run(argv, monkeypatch, capsys, stop_at_reference=False)
    assert code == 130 and err.strip() == ("interrupted in train reference, step 4 of 6; to continue: python "
                                           f"{sys.argv[0]} {shlex.join(argv + ['--resume'])}")
    ckpt = tmp_path / "run" / "reference" / "checkpoint"
    assert torch.load(ckpt / "trainer_state.pt", weights_only=True)["step"] == 2
    os.replace(ckpt, str(ckpt) + ".tmp")  # as if killed after the delete, before the rename
    reference_steps.clear()
    monkeypatch.setattr(alol, "train_step", lambda *a, **kw: reference_steps.append(a[6] is None) or real(*a, **kw))
    code, _, _, _ = run(argv + ["--resume"], monkeypatch, capsys, stop_at_reference=False)
    assert code == 0 and ckpt.exists() and not (tmp_path / "run" / "reference" / "checkpoint.tmp").exists()
    assert sum(reference_steps) == 4  # steps 3-6: continued from the finished checkpoint, not from step 0
    log = [json.loads(line)["step"] for line in open(tmp_path / "run" / "reference" / "log.jsonl")]
    assert log == [1, 2, 3, 4, 5, 6]


def test_warning_when_truncation_empties_responses(tmp_path, monkeypatch, capsys):
    code, _, out, reached = run(base(tmp_path, "--max-response-len", "1"), monkeypatch, capsys)
    assert reached and "warning: --max-response-len 1 cuts every response down to its final EOS" in out


# ---- round 2 (issue 21): run identity, one run per folder, disk full, SIGTERM, settings and data checked first ----
ALOL = str(Path(__file__).resolve().parent.parent / "alol.py")


def one_line(err, pattern):
    return len(err.strip().splitlines()) == 1 and re.search(pattern, err)


def hh_flags(tmp_path, model_dir, reward_model, data, *extra):
    return base(tmp_path, "--task", "hh", "--hh-dataset", str(data), "--model", str(model_dir), "--hh-reward-model",
                str(reward_model), "--hh-test-reward-model", str(reward_model), "--n-train", "0", "--n-val", "4", "--n-test", "2", "--batch-size", "4",
                "--grad-accum", "1", "--max-prompt-len", "24", "--max-response-len", "8", "--algo", "nll", *extra)


def hh_dataset(path, chosen=lambda subset, split, i: "Sure, step by step.", rejected=lambda *a: "No."):
    """The hub's hh-rlhf layout, a few conversations per subset and split; chosen/rejected(subset, split, i) give the
    final assistant replies (None: the transcript ends on a human turn)."""
    for subset in tasks.hh.HH_SUBSETS:
        (path / subset).mkdir(parents=True, exist_ok=True)
        for split, n in (("train", 4), ("test", 2)):
            rows = [{side: f"\n\nHuman: {split} {i}: any tips for {subset}?" + (
                "" if reply(subset, split, i) is None else f"\n\nAssistant: {reply(subset, split, i)}")
                for side, reply in (("chosen", chosen), ("rejected", rejected))} for i in range(n)]
            with gzip.open(path / subset / f"{split}.jsonl.gz", "wt") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


@pytest.fixture(scope="module")
def reward_model_dir(model_dir, tmp_path_factory):
    """A one-logit reward model of OpenAssistant's kind (HH's default), tiny and random, with the policy's tokenizer."""
    path = tmp_path_factory.mktemp("reward") / "rm"
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = reward_models.NeoXRewardModel(reward_models.NeoXRewardConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=256, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def perturb(model_dir, cls=transformers.AutoModelForCausalLM):
    """One weight of a saved model changed in place, as a retrained or re-downloaded model would be."""
    model = cls.from_pretrained(model_dir)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1.0
    model.save_pretrained(model_dir)


# 1. The run's identity: anything it was built from, changed, refuses --resume
@pytest.mark.parametrize("flag", ["--model", "--ref-model", "--lora-base"])
def test_resume_after_a_model_changed_is_refused(tmp_path, model_dir, monkeypatch, capsys, flag):
    shutil.copytree(model_dir, tmp_path / "policy")
    flags = ["--model", str(tmp_path / "policy"), "--lora-r", "4"] if flag == "--lora-base" else \
        [flag, str(tmp_path / "policy")]
    argv = base(tmp_path, *flags, "--algo", "nll")
    assert run(argv, monkeypatch, capsys)[3]
    perturb(tmp_path / "policy")
    code, err, _, reached = run(argv + ["--resume"], monkeypatch, capsys)
    name = "--model" if flag == "--lora-base" else flag
    assert code == 1 and one_line(err, rf"differs in: {name} files\)") and not reached


def test_resume_after_the_task_data_or_its_reward_model_changed_is_refused(tmp_path, model_dir, reward_model_dir,
                                                                            monkeypatch, capsys):
    """HH reads a dataset folder and a reward model, neither named by a data file: the data as read and the reward
    model's files are part of the run's identity."""
    shutil.copytree(reward_model_dir, tmp_path / "rm")
    data = hh_dataset(tmp_path / "hh")
    argv = hh_flags(tmp_path, model_dir, tmp_path / "rm", data)
    assert run(argv, monkeypatch, capsys)[3]
    hh_dataset(data, chosen=lambda subset, split, i: "Sure, step by step." if i else "Edited.")
    code, err, _, reached = run(argv + ["--resume"], monkeypatch, capsys)
    assert code == 1 and one_line(err, r"differs in: data\)") and not reached
    hh_dataset(data)  # back as it was: the run resumes
    assert run(argv + ["--resume"], monkeypatch, capsys)[3]
    perturb(tmp_path / "rm", reward_models.NeoXRewardModel)
    code, err, _, reached = run(argv + ["--resume"], monkeypatch, capsys)
    assert code == 1 and one_line(err, r"differs in: [^)]*--hh-reward-model files[^)]*\)") and not reached


def test_resume_that_would_drop_methods_is_refused(tmp_path, monkeypatch, capsys):
    argv = base(tmp_path, "--algo", "nll,a_lol")
    assert run(argv, monkeypatch, capsys)[3]
    code, err, _, reached = run(argv + ["--resume", "--algo", "nll"], monkeypatch, capsys)
    assert code == 1 and one_line(err, r"--resume with --algo nll would drop a_lol from this run's results: pass "
                                       r"--algo nll,a_lol") and not reached
    assert run(argv + ["--resume", "--algo", "nll,a_lol,wbc"], monkeypatch, capsys)[3]  # adding one is fine


def test_resume_keeps_the_selection_of_a_best_tmp(tmp_path, monkeypatch, capsys):
    """Killed between deleting best/ and renaming best.tmp: the selected step survives --resume."""
    argv = base(tmp_path, "--algo", "nll", "--eval-every", "1", "--report-to", "none")
    assert run(argv, monkeypatch, capsys, stop_at_reference=False)[0] == 0
    first = json.load(open(tmp_path / "run" / "results.json"))
    best = tmp_path / "run" / "nll" / "best"
    os.replace(best, str(best) + ".tmp")
    (tmp_path / "run" / "results.json").unlink()
    code, err, _, _ = run(argv + ["--resume"], monkeypatch, capsys, stop_at_reference=False)
    assert code == 0, err
    again = json.load(open(tmp_path / "run" / "results.json"))
    assert again["methods"]["nll"]["selected"] == first["methods"]["nll"]["selected"] is not None


# 2. One live run per folder
def test_one_live_run_per_folder_and_a_dead_runs_lock_is_taken_over(tmp_path, monkeypatch, capsys):
    argv = base(tmp_path, "--algo", "nll", "--ref-epochs", "2000", "--report-to", "none")
    live = subprocess.Popen([sys.executable, ALOL, *argv], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "run" / "reference" / "log.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    try:
        before = sorted(p.name for p in (tmp_path / "run").iterdir())
        for extra in ([], ["--resume"], ["--overwrite"]):
            code, err, _, reached = run(argv + extra, monkeypatch, capsys)
            assert code == 1 and one_line(err, rf"--out-dir .*run is in use by another alol run \(pid {live.pid}\)")
            assert not reached
        assert live.poll() is None and sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    finally:
        live.kill()  # as a crash: the lock file stays, the OS frees the lock
        live.wait()
    assert run(argv + ["--resume"], monkeypatch, capsys)[3]


# 3. Disk full
@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a folder on a tmpfs of `size` bytes; remount(size) resizes it (needs root)."""
    disk = tmp_path / "disk"
    disk.mkdir()

    def mount(size, remount=False):
        options = f"{'remount,' if remount else ''}size={size // 1024}k"
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(disk)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
        return disk

    yield mount
    assert subprocess.run(["umount", str(disk)], capture_output=True).returncode in (0, 32)  # 32: not mounted


@pytest.mark.parametrize("when", ["first checkpoint", "later checkpoint", "while writing"])
def test_disk_full_is_one_line_keeps_the_last_checkpoint_and_resume_works(tmp_path, small_disk, monkeypatch, capsys,
                                                                          when):
    """A full disk found before a checkpoint is written, or while it is (the estimate of its size made too low:
    safetensors and torch.save then fail with errors of their own)."""
    argv = base(tmp_path, "--algo", "nll", "--save-every", "2", "--report-to", "none")  # 3 reference steps
    splits, _ = tasks.toy.load(alol.parse_args(argv))
    n = sum(p.numel() for p in models.tiny_gpt2(models.bpe_tokenizer(splits["train"]), alol.parse_args(argv))
            .parameters())
    checkpoint = 12 * n  # fp32 weights and AdamW's two moments: a checkpoint is at least this
    disk = small_disk(int(1.5 * checkpoint) if when == "later checkpoint" else 3 * 2**20)  # one fits, not two
    if when == "while writing":
        real = checkpoints.saved_bytes
        monkeypatch.setattr(checkpoints, "saved_bytes", lambda *a: real(*a) // 3)
    argv = argv[:argv.index("--out-dir") + 1] + [str(disk / "run")] + argv[argv.index("--out-dir") + 2:]
    code, err, _, _ = run(argv, monkeypatch, capsys, stop_at_reference=False)
    assert code == 1 and one_line(err, r"^error: disk full: writing .*/reference/checkpoint\.tmp needs about [\d.]+ "
                                       r"MiB, [\d.]+ MiB are free; free space, then to continue: python .* --resume$")
    ckpt = disk / "run" / "reference" / "checkpoint"
    if when == "later checkpoint":  # the previous one is intact
        assert checkpoints.verified(ckpt) and torch.load(ckpt / "trainer_state.pt")["step"] == 2
    else:
        assert not ckpt.exists()
    assert not (disk / "run" / "reference" / "checkpoint.tmp").exists()  # the partial files are deleted
    small_disk(64 * 2**20, remount=True)
    code, err, _, _ = run(argv + ["--resume"], monkeypatch, capsys, stop_at_reference=False)
    assert code == 0, err
    assert [json.loads(r)["step"] for r in open(disk / "run" / "reference" / "log.jsonl")] == [1, 2, 3]


def test_a_partial_checkpoint_tmp_is_not_taken_for_a_complete_one(tmp_path, monkeypatch, capsys):
    """Disk full (or a kill) while checkpoint.tmp was written, after an earlier delete left no checkpoint/: its
    truncated trainer_state.pt does not verify, so --resume starts the stage again instead of failing on it."""
    argv = base(tmp_path, "--algo", "nll", "--save-every", "2", "--report-to", "none")
    assert run(argv, monkeypatch, capsys, stop_at_reference=False)[0] == 0
    ckpt = tmp_path / "run" / "reference" / "checkpoint"
    os.replace(ckpt, str(ckpt) + ".tmp")
    state = Path(str(ckpt) + ".tmp") / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:len(state.read_bytes()) // 2])
    (tmp_path / "run" / "results.json").unlink()
    code, err, _, _ = run(argv + ["--resume"], monkeypatch, capsys, stop_at_reference=False)
    assert code == 0, err
    assert torch.load(ckpt / "trainer_state.pt")["step"] == 3 and checkpoints.verified(ckpt)


# 4. SIGTERM, as schedulers send it (torchrun: tests/test_faults_mp.py)
def test_sigterm_says_how_to_resume_and_exits_143(tmp_path, monkeypatch, capsys):
    argv = base(tmp_path, "--algo", "nll", "--n-train", "96", "--save-every", "2", "--report-to", "none")
    real, steps = alol.train_step, []

    def sigterm_at_fourth_reference_step(*a, **kw):
        steps.append(a[6] is None)
        if len(steps) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)

    class Killed(Exception):
        pass

    def killed(*a):  # what SIGTERM would do to pytest if alol did not handle it
        raise Killed

    monkeypatch.setattr(alol, "train_step", sigterm_at_fourth_reference_step)
    previous = signal.signal(signal.SIGTERM, killed)
    try:
        code, err, _, _ = run(argv, monkeypatch, capsys, stop_at_reference=False)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 143 and err.strip() == ("terminated (SIGTERM) in train reference, step 4 of 6; to continue: python "
                                           f"{sys.argv[0]} {shlex.join(argv + ['--resume'])}")
    monkeypatch.setattr(alol, "train_step", real)
    assert run(argv + ["--resume"], monkeypatch, capsys, stop_at_reference=False)[0] == 0


# 5. Every setting and every model-data fit, checked before anything is written
@pytest.mark.parametrize("flags,exit_code,message", [
    (["--lora-r", "4", "--lora-dropout", "1.5"], 2, r"--lora-dropout must be in \[0, 1\)"),
    (["--lora-r", "4", "--lora-targets", "c_attn,nosuchmodule"], 1,
     r"--lora-targets nosuchmodule: no module of the model is named so"),
    (["--lora-r", "4", "--lora-targets", "lm_head"], 1,
     r"--lora-targets lm_head: the output layer cannot take an adapter"),
    (["--lora-r", "4", "--lora-targets", "ln_1"], 1, r"--lora-targets ln_1: a LayerNorm cannot take a LoRA adapter"),
    (["--max-prompt-len", "40", "--max-response-len", "30"], 1,
     r"the longest training prompt \(40 tokens, --max-prompt-len 40\) plus its response \(\d+, --max-response-len 30\) "
     r"exceed the model's 56 positions: lower --max-prompt-len or --max-response-len"),
    (["--max-prompt-len", "40", "--max-response-len", "8", "--eval-max-new-tokens", "32"], 1,
     r"plus --eval-max-new-tokens 32 exceed the model's 56 positions: lower --eval-max-new-tokens"),
])
def test_settings_and_fit_are_checked_before_anything_is_written(tmp_path, model_dir, monkeypatch, capsys, flags,
                                                                  exit_code, message):
    rows = [{**GOOD, "prompt": f"r/pets : any tips for {pet} ? " * 12, "response": "good luck ! " * 12}
            for pet in ("cats", "dogs", "fish")]
    files = [flag for split in ("train", "val", "test") for flag in (f"--{split}-file", jsonl(tmp_path, split, rows))]
    argv = base(tmp_path, "--model", str(model_dir), *files, *flags)
    argv = argv[:argv.index("--eval-max-new-tokens")] + argv[argv.index("--eval-max-new-tokens") + 2:]  # the default
    code, err, _, reached = run(argv, monkeypatch, capsys)
    assert code == exit_code and re.search(message, err) and not reached
    assert not (tmp_path / "run").exists()  # no config.json: fixing the flag needs no --overwrite


def test_lora_targets_named_as_the_help_says_get_adapters(model_dir):
    """A comma list of module names (peft would read one string as a regular expression for whole names, matching
    none, and fail after config.json was written)."""
    args = alol.parse_args(["--device", "cpu", "--lora-r", "4", "--lora-targets", "c_attn,c_fc"])
    adapter = models.for_training(models.load_policy(str(model_dir), args), args)
    adapted = {name.rpartition(".lora_A")[0].rpartition(".")[2] for name, _ in adapter.named_parameters()
               if ".lora_A" in name}
    assert adapted == {"c_attn", "c_fc"}


def test_triton_kernel_without_cuda_is_refused_first(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err, _, reached = run(base(tmp_path, "--kernel", "triton"), monkeypatch, capsys)
    assert code == 2 and "--kernel triton needs CUDA" in err and not reached and not (tmp_path / "run").exists()


# 6. Task data that parses to an empty split
@pytest.mark.parametrize("empty,message", [
    ("a test subset", r"helpful-online/test\.jsonl\.gz: no pair is left after PRO's parsing and filters .*, so the "
                      r"test-helpful-online split is empty"),
    ("the rejected side", r"<every subset>/train\.jsonl\.gz: no pair is left after PRO's parsing and filters .*, so "
                          r"the train_chosen split is empty"),
])
def test_an_empty_split_fails_the_first_run_and_is_not_cached(tmp_path, model_dir, reward_model_dir, monkeypatch,
                                                               capsys, empty, message):
    if empty == "a test subset":
        data = hh_dataset(tmp_path / "hh", chosen=lambda subset, split, i: None if (subset, split) == (
            "helpful-online", "test") else "Sure.")
    else:
        data = hh_dataset(tmp_path / "hh", rejected=lambda *a: None)
    code, err, _, reached = run(hh_flags(tmp_path, model_dir, reward_model_dir, data), monkeypatch, capsys)
    assert code == 1 and one_line(err, message) and not reached
    name = "test-helpful-online" if empty == "a test subset" else "train_chosen"  # the splits before it are cached
    assert not list((tmp_path / "cache").rglob(f"{name}.jsonl")) and not (tmp_path / "run").exists()


def test_no_cache_of_an_empty_split_is_written(tmp_path):
    with pytest.raises(AlolError, match="the task's val split holds no examples after parsing; nothing is cached"):
        caches.scored_splits(str(tmp_path / "cache"), ("train", "val"), lambda: {"train": [GOOD], "val": []},
                             lambda parts: None)
    assert not (tmp_path / "cache").exists()


# 7. Smaller ones
def test_a_causal_lm_is_refused_as_a_reward_model(tmp_path, model_dir, monkeypatch, capsys):
    code, err, _, reached = run(hh_flags(tmp_path, model_dir, model_dir, hh_dataset(tmp_path / "hh")), monkeypatch,
                                capsys)
    assert code == 1 and not reached and one_line(err, r"gpt2: not a trained reward model or classifier "
                                                       r"\(GPT2LMHeadModel\): its weights lack score\.weight")


def test_overwrite_through_a_symlinked_out_dir(tmp_path, monkeypatch, capsys):
    argv = base(tmp_path)
    assert run(argv, monkeypatch, capsys)[3]
    (tmp_path / "link").symlink_to(tmp_path / "run")
    code, err, _, reached = run(argv + ["--out-dir", str(tmp_path / "link"), "--overwrite"], monkeypatch, capsys)
    assert code is None and reached, err
    assert (tmp_path / "link").is_symlink() and (tmp_path / "run" / "config.json").exists()


def test_help_prints_every_help_text():
    out = subprocess.run([sys.executable, ALOL, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "~30% slower" in out.stdout and "option_strings" not in out.stdout + out.stderr


def test_a_reward_component_named_reward_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "named_reward.py").write_text("import torch\ndef score(p, r):\n    return {'reward': torch.full("
                                              "(len(r),), 0.5), 'b': torch.full((len(r),), 0.5)}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    flags = data_flags(tmp_path, [{**GOOD, "rewards": {"reward": 0.5, "b": 0.5}}] * 4) + ["--reward-fn",
                                                                                         "named_reward:score"]
    code, err, _, reached = run(base(tmp_path, *flags), monkeypatch, capsys)
    assert code == 1 and one_line(err, r"train\.jsonl:1: reward component 'reward' has the name of a column of the "
                                       r"results table or of the summed reward: rename it") and not reached
