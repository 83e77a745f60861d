"""Scale-out on CPU: `torchrun --nproc_per_node 2` (gloo) against one process with twice the gradient accumulation,
resume of a killed 2-process run, and LoRA adapters through peft."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import alol
import models
import tasks.toy
from conftest import load_policy

ROOT = pathlib.Path(__file__).resolve().parent.parent
LR = 1e-3
TINY = ["--device", "cpu", "--kernel", "torch", "--n-train", "192", "--n-val", "16", "--n-test", "8",
        "--value-samples", "2", "--value-epochs", "2", "--batch-size", "16", "--ref-epochs", "2", "--epochs", "1",
        "--eval-max-new-tokens", "6", "--eval-batch-size", "4", "--report-to", "none", "--algo", "nll,a_lol,dpo",
        "--lr", str(LR), "--ref-lr", str(LR)]


def launch(tmp, name, processes, *extra, wait=True):
    """python alol.py (processes = 1) or torchrun --standalone --nproc_per_node N alol.py, as a user runs them."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
        if processes > 1 else [sys.executable]
    command = [*launcher, str(ROOT / "alol.py"), *TINY, "--out-dir", str(tmp / name), "--cache-dir", str(tmp / f"cache-{name}"),
               *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(command, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    if not wait:
        return job
    out = job.communicate(timeout=600)[0]
    assert job.returncode == 0, out
    return out


def weights(run, stage):
    return load_file(run / stage / "checkpoint" / "model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale")
    printed = launch(tmp, "two", 2)
    assert "global batch: 16 sequences x 1 micro-batches x 2 processes = 32 per optimiser step" in printed
    assert printed.count("value head: held-out MSE") == 1  # rank 0 alone prints
    launch(tmp, "one", 1, "--grad-accum", "2")
    return tmp


def test_two_processes_follow_one_process_with_twice_the_accumulation(runs):
    """The same global batches, the same loss: only the order of the gradient sums differs (gloo's all-reduce of two
    halves against one process accumulating them). Adam moves a weight by at most about lr per step, and rounding-
    level gradient differences can change that step only where the gradient itself is at rounding level; so the
    largest difference stays below one step (lr) and the mean far below it. A missing or doubled gradient sync, or
    a wrong slice of the batch, changes every weight's update by O(lr) per step."""
    for stage in ("reference", "nll", "a_lol", "dpo"):  # dpo: two forward passes (its replies) per backward
        one, two = weights(runs / "one", stage), weights(runs / "two", stage)
        diff = torch.cat([(one[k] - two[k]).abs().flatten() for k in one])
        assert diff.max() < LR and diff.mean() < LR * 1e-3, (stage, diff.max(), diff.mean())
    (one,), (two,) = [list((runs / f"cache-{name}").glob("frozen-*.pt")) for name in ("one", "two")]
    one, two = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    # log-probs are sums over a 128-wide model of weights that differ by ~1e-6: far below 1e-3 in log space
    assert torch.allclose(one["ref_logp"], two["ref_logp"], atol=1e-3) and torch.allclose(one["value"], two["value"], atol=1e-3)
    assert torch.allclose(one["ref_logp_rejected"], two["ref_logp_rejected"], atol=1e-3)
    results = [json.load(open(runs / name / "results.json")) for name in ("one", "two")]
    for name in ("reference", *results[0]["algos"]):  # generations seeded by batch position: the same text
        a, b = [r["reference"] if name == "reference" else r["methods"][name] for r in results]
        assert {k: v for k, v in a.items() if k != "train_seconds"} == {k: v for k, v in b.items() if k != "train_seconds"}


def test_resume_of_a_killed_two_process_run(runs):
    """kill -9 of torchrun and its workers after the first checkpoints; --resume ends with the uninterrupted run's
    weights, bit for bit (the same operations in the same order on CPU)."""
    job = launch(runs, "cut", 2, "--save-every", "1", wait=False)
    state = runs / "cut" / "reference" / "checkpoint" / "trainer_state.pt"
    deadline = time.time() + 300
    while not state.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    deadline = time.time() + 30  # the workers die with torchrun: wait until the OS has ended them (and so freed the
    while time.time() < deadline:  # run directory's lock), as a user resuming after a crash would find them
        try:
            os.killpg(job.pid, 0)
            time.sleep(0.1)
        except ProcessLookupError:
            break
    assert not (runs / "cut" / "results.json").exists()  # killed before the end
    launch(runs, "cut", 2, "--save-every", "1", "--resume")
    for stage in ("reference", "nll", "a_lol", "dpo"):  # dpo: two forward passes (its replies) per backward
        two, cut = weights(runs / "two", stage), weights(runs / "cut", stage)
        assert all(torch.equal(two[k], cut[k]) for k in two), stage


def test_lora_trains_adapters_only_and_merges_into_the_reference(tmp_path, monkeypatch):
    args = alol.parse_args([*TINY, "--out-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
                            "--lora-r", "4", "--algo", "a_lol"])
    splits, _ = tasks.toy.load(args)
    tok = models.bpe_tokenizer(splits["train"])
    data = alol.encode(splits["train"], tok, args)
    torch.manual_seed(0)
    policy = alol.disable_dropout(models.tiny_gpt2(tok, args))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    alol.train_policy(policy, tok, data, "nll", str(tmp_path / "ref"), args, 1, 1e-2)
    adapter = tmp_path / "ref" / "checkpoint"
    assert (adapter / "adapter_model.safetensors").exists() and not (adapter / "model.safetensors").exists()
    merged = load_policy(str(tmp_path / "ref" / "model"), args)  # from_pretrained loads the merged model
    assert set(merged.state_dict()) == set(before)
    changed = [k for k in before if not torch.equal(before[k], merged.state_dict()[k])]
    # only the weights LoRA adapts change (GPT-2's attention and MLP projections); embeddings, norms, biases do not
    assert changed and all(k.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")) for k in changed)
    import peft

    base = alol.disable_dropout(models.tiny_gpt2(tok, args))
    base.load_state_dict(before)
    with_adapter = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    batch = alol.take(data, torch.arange(8))
    with torch.no_grad():
        unmerged = alol.token_logprobs(with_adapter.base_model.model, batch, args)
        assert torch.allclose(alol.token_logprobs(merged, batch, args), unmerged, atol=1e-5)
    # a method's fresh adapter on the merged reference: B = 0 at start, so pi = pi_ref and the ratio is exactly 1
    frozen = {"ref_logp": torch.zeros(data["input_ids"].shape), "value": torch.zeros(len(data["reward"]))}
    with torch.no_grad():
        for i in range(0, len(data["reward"]), 64):
            idx = torch.arange(i, min(i + 64, len(data["reward"])))
            logp = alol.token_logprobs(merged, alol.take(data, idx), args)
            frozen["ref_logp"][idx, :logp.shape[1]] = logp
    steps, real = [], alol.train_step
    monkeypatch.setattr(alol, "train_step", lambda *a, **kw: steps.append(real(*a, **kw)) or steps[-1])
    alol.train_policy(merged, tok, data, "a_lol", str(tmp_path / "a_lol"), args, 1, 1e-2, frozen)
    assert steps[0]["ratio"] == pytest.approx(1.0, abs=1e-6) and steps[0]["clip_frac"] == 0.0
    assert steps[-1]["ratio"] != pytest.approx(1.0, abs=1e-3)  # the adapter did train
