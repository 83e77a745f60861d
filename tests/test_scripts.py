"""scripts/: the GPU check refuses a machine without CUDA; the rehearsal's tokenizer, data and stage table."""
import os
import pathlib
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import rehearsal  # noqa: E402  (scripts/ is not a package)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run the whole check")
def test_gpu_check_refuses_without_cuda(tmp_path):
    start = time.time()
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "report.md")],
                          capture_output=True, text=True, env=dict(os.environ, PYTHON=sys.executable))
    assert done.returncode != 0 and time.time() - start < 30
    assert "no CUDA GPU" in done.stderr and done.stderr.count("\n") == 1  # one line
    assert not (tmp_path / "report.md").exists()


def test_gpu_check_names_a_missing_python():
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          env=dict(os.environ, PYTHON="no-such-python"))
    assert done.returncode != 0 and "no 'no-such-python' on PATH" in done.stderr


def test_rehearsal_tokenizer_and_data_have_the_real_sizes(tmp_path):
    """GPT-2's vocabulary size with <|endoftext|> last; Kaggle's columns; pairs of 150-300 tokens (what the
    preprocessing keeps), replies of at most 128."""
    tok = rehearsal.tokenizer()
    assert len(tok) == 50257 and tok.eos_token_id == 50256 == tok.pad_token_id
    ids = tok("some words here" + rehearsal.EOS)["input_ids"]
    assert ids[-1] == 50256 and tok.decode(ids) == "some words here" + rehearsal.EOS
    rehearsal.kaggle_csvs(tmp_path, tok, 12)
    for name in ("comments_positive.csv", "comments_negative.csv"):
        frame = pd.read_csv(tmp_path / name)
        assert list(frame.columns) == rehearsal.KAGGLE_COLUMNS and len(frame) == 12
        for parent, reply in zip(frame.parent_text, frame.text):
            n_reply = len(tok(reply + rehearsal.EOS)["input_ids"])
            assert n_reply <= 128 and 150 <= len(tok(parent + rehearsal.EOS)["input_ids"]) + n_reply <= 300
            assert len(parent.split()) <= 100 and len(reply.split()) <= 100


def test_rehearsal_groups_progress_bars_into_stages():
    def event(stage, seconds, rss):
        return {"stage": stage, "seconds": seconds, "rss_peak_mb": rss}

    events = [event("start: load data, models", 1, 100), event("reward fluency", 2, 300),
              event("between bars: load, save, score", 1, 200), event("train nll", 5, 900),
              event("between bars: load, save, score", 1, 400), event("generate", 3, 500), event("generate", 4, 600),
              event("reward", 0.5, 100), event("reward depth", 1, 700), event("generate", 2, 500),
              event("end", 0.5, 100)]
    rows = rehearsal.phases(events)
    assert [(r["stage"], r["seconds"], r["rss_peak_mb"]) for r in rows] == [
        ("start: read the CSVs, preprocess, load the policy, score", 4, 300), ("train nll", 6, 900),
        ("generate, score", 8.5, 700), ("generate", 2.5, 500)]
