"""The fault battery: bad inputs and interruptions, each through `alol.cli` as a user meets them. Every case checks
the one-line message, the exit code, how far the run got (a bad input must fail before the reference stage) and
what is on disk afterwards (nothing lost, no half-written run, no stale cache used)."""
import gzip
import json
import multiprocessing
import os
import re
import shlex
import sys

import pytest
import torch
import transformers

import alol
import checks
import models
import rundir
import tasks.toy
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
