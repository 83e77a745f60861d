"""Tests of alol.py: the loss against hand-computed vectors, the invariances the pipeline relies on, the cache,
sampling, resume, user-facing errors and a short end-to-end run. Everything runs on CPU with tiny models."""
import ast
import dataclasses
import importlib
import inspect
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import alol
import caches
import cli
import distributed
import kernels
import models
import rundir
import tasks.toy
from conftest import load_policy

# Computed by hand from a line-by-line transcription of the official loss code (tutorial.md, section 7):
# inputs and the official losses, for eps = 0.9, 0.2 and None.
LOGP = [[-1.0, -2.0, -0.5], [-0.3, -1.0, -5.0], [-2.0, -1.0, -1.0]]
REF_LOGP = [[-1.2, -2.5, -0.4], [-1.5, -2.0, -0.7], [-1.0, -1.0, -1.0]]
MASK = [[1, 1, 1], [1, 1, 0], [1, 1, 1]]
REWARD, VALUE = [3.2, 2.0, 1.0], [2.9, 1.5, 1.8]
EXPECTED = {"nll": (2.933333, 2.933333, 2.933333), "wbc": (5.933333, 5.933333, 5.933333),
            "r_gold": (1.733496, 1.733496, 1.733496), "r_lol": (8.939749, 6.586667, 15.114761),
            "a_lol": (1.049408, 0.680000, 2.593161), "a_lol_ref_free": (0.566667, 0.566667, 0.566667),
            "a_lol_seq": (0.908793, 0.665242, 1.116179)}


def vectors(dtype=torch.float64):
    logp = torch.tensor(LOGP, dtype=dtype, requires_grad=True)
    return logp, torch.tensor(REF_LOGP, dtype=dtype), torch.tensor(MASK), torch.tensor(REWARD, dtype=dtype), torch.tensor(VALUE, dtype=dtype)


def small_args(tmp_path, *extra):
    return alol.parse_args(["--device", "cpu", "--kernel", "torch", "--out-dir", str(tmp_path / "run"),
                            "--cache-dir", str(tmp_path / "cache"), "--n-train", "200", "--n-val", "40", "--n-test", "20",
                            "--value-samples", "2", "--value-epochs", "2", "--batch-size", "8", "--ref-epochs", "1",
                            "--epochs", "1", "--eval-max-new-tokens", "8", *extra])


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Toy splits, tokenizer, the encoded training set and a saved tiny GPT-2 with the default dropout (0.1)."""
    tmp = tmp_path_factory.mktemp("toy")
    args = small_args(tmp)
    torch.manual_seed(0)
    splits, _ = tasks.toy.load(args)
    tok = models.bpe_tokenizer(splits["train"])
    tok.padding_side = tok.truncation_side = "left"
    model = models.tiny_gpt2(tok, args)
    assert model.config.resid_pdrop > 0  # so that the dropout-off tests mean something
    model.save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    return {"args": args, "splits": splits, "tok": tok, "path": str(tmp / "model"), "train": alol.encode(splits["train"], tok, args)}


# ---- 7. the loss ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", sorted(EXPECTED))
@pytest.mark.parametrize("column,eps", [(0, 0.9), (1, 0.2), (2, None)])
def test_loss_reproduces_official_vectors(algo, column, eps):
    logp, ref_logp, mask, reward, value = vectors()
    loss = alol.alol_loss(logp, ref_logp, mask, reward, value, algo, clip_eps=eps)
    assert abs(loss.item() - EXPECTED[algo][column]) < 1e-5


def test_loss_a_lol_kl_vector_and_fp32():
    logp, ref_logp, mask, reward, value = vectors(torch.float32)
    assert abs(alol.alol_loss(logp, ref_logp, mask, reward, value, "a_lol_kl", 0.9, kl_beta=0.1).item() - 0.626667) < 1e-5
    assert abs(alol.alol_loss(logp, ref_logp, mask, reward, value, "a_lol", 0.9).item() - 1.049408) < 1e-5


def test_loss_gradients_are_minus_weight_over_batch():
    logp, ref_logp, mask, reward, value = vectors()
    alol.alol_loss(logp, ref_logp, mask, reward, value, "a_lol", 0.9).backward()
    assert torch.allclose(logp.grad[0], torch.full((3,), -1.822119 * 0.3 / 3, dtype=torch.float64), atol=1e-6)
    assert torch.equal(logp.grad[2], torch.zeros(3, dtype=torch.float64))  # A+ = 0
    assert logp.grad[1, 2] == 0  # masked
    logp.grad = None
    alol.alol_loss(logp, ref_logp, mask, reward, value, "a_lol_kl", 0.9, kl_beta=0.1).backward()
    assert torch.allclose(logp.grad[2], torch.full((3,), 0.1 / 3, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(logp.grad[0], torch.full((3,), (0.1 - 0.3) / 3, dtype=torch.float64), atol=1e-6)


def test_loss_weights_are_constants_whatever_the_caller_passes():
    logp, ref_logp, mask, reward, value = vectors()
    ref_logp, reward, value = (x.clone().requires_grad_() for x in (ref_logp, reward, value))
    for algo in EXPECTED:
        alol.alol_loss(logp, ref_logp, mask, reward, value, algo, 0.9).backward()
        assert ref_logp.grad is None and reward.grad is None and value.grad is None, algo


def test_loss_masked_entries_do_not_matter():
    logp, ref_logp, mask, reward, value = vectors()
    for algo in EXPECTED:
        base = alol.alol_loss(logp, ref_logp, mask, reward, value, algo, 0.9)
        garbage = torch.where(mask.bool(), ref_logp, torch.tensor(-math.inf, dtype=torch.float64))
        noisy = torch.where(mask.bool(), logp.detach(), torch.tensor(123.0, dtype=torch.float64)).requires_grad_()
        assert alol.alol_loss(noisy, garbage, mask, reward, value, algo, 0.9).item() == pytest.approx(base.item(), abs=1e-12)


def test_loss_ratio_guards():
    # a huge log-ratio (a 128-token sum) with A = 0: no inf * 0 = NaN, with or without clipping
    logp = torch.full((2, 128), -0.1, requires_grad=True)
    ref_logp, mask = torch.full((2, 128), -5.0), torch.ones(2, 128)
    for eps in (0.2, 0.9, 3.0, None):
        loss, stats = alol.alol_loss(logp, ref_logp, mask, torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5]), "a_lol", eps, return_stats=True)
        assert torch.isfinite(loss) and loss.item() == 0.0 and stats["clip_frac"] == 1.0
    ratio_at_boundary = alol.alol_loss(torch.tensor([[math.log(1.9)]]), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1), torch.zeros(1), "r_lol", 0.9)
    assert ratio_at_boundary.item() == pytest.approx(-1.9 * math.log(1.9), rel=1e-6)
    with pytest.raises(ValueError):
        alol.alol_loss(logp, ref_logp, mask, torch.ones(2), torch.zeros(2), "a_lol", clip_eps=0.0)
    with pytest.raises(ValueError):
        alol.alol_loss(logp, ref_logp, mask, torch.ones(2), torch.zeros(2), "ppo")


# ---- 2/4. layout, log-probs and dropout ----------------------------------------------------------------------
def test_encode_layout_by_hand(toy):
    tok, args = toy["tok"], toy["args"]
    data = alol.encode([{"prompt": "r/pets : any tips for cats ?", "response": "ok", "rewards": {"a": 0.5}},
                        {"prompt": "ok", "response": "good luck !", "rewards": {"a": 1.0, "b": 0.25}}], tok, args)
    p0, r0 = tok("r/pets : any tips for cats ?")["input_ids"], tok("ok")["input_ids"]
    p1, r1 = tok("ok")["input_ids"], tok("good luck !")["input_ids"]
    eos = tok.eos_token_id
    assert data["input_ids"][0, :len(p0) + len(r0) + 1].tolist() == p0 + r0 + [eos]
    assert data["input_ids"][1, :len(p1) + len(r1) + 1].tolist() == p1 + r1 + [eos]
    assert data["prompt_mask"][1].tolist() == [True] * len(p1) + [False] * (data["input_ids"].shape[1] - len(p1))
    assert data["response_mask"][1].nonzero().flatten().tolist() == list(range(len(p1), len(p1) + len(r1) + 1))
    assert data["response_mask"][0, len(p0) + len(r0)]  # the final EOS is a trained token
    assert data["reward"].tolist() == [0.5, 1.25]


def test_prompt_left_truncated_response_right_truncated(toy):
    tok, args = toy["tok"], toy["args"]
    long_prompt, long_response = " ".join(["any tips for cats ?"] * 20), " ".join(["good luck !"] * 30)
    data = alol.encode([{"prompt": long_prompt, "response": long_response, "rewards": {}}], tok, args)
    ids = data["input_ids"][0]
    assert int(data["prompt_mask"].sum()) == args.max_prompt_len
    assert ids[:args.max_prompt_len].tolist() == tok(long_prompt)["input_ids"][-args.max_prompt_len:]
    assert int(data["response_mask"].sum()) == args.max_response_len and ids[-1] == tok.eos_token_id


def test_padding_invariance(toy):
    """One example alone gives the same summed log-prob as inside a right-padded batch of longer examples."""
    args, train = toy["args"], toy["train"]
    policy = load_policy(toy["path"], args)
    lengths = train["attention_mask"].sum(1)
    short, longer = int(lengths.argmin()), lengths.argsort(descending=True)[:3].tolist()
    with torch.no_grad():
        alone = alol.token_logprobs(policy, alol.take(train, torch.tensor([short])), args).sum(-1)
        batched = alol.token_logprobs(policy, alol.take(train, torch.tensor(longer + [short])), args).sum(-1)
    assert int(lengths[short]) < int(lengths[longer[0]])
    assert torch.allclose(alone[0], batched[-1], atol=1e-5)


def test_ratio_is_one_at_step_zero_with_dropout_off(toy):
    """theta = ref: in train mode with dropout disabled, rho = 1 exactly and the A-LoL loss is mean(A+ * S)."""
    args, train = toy["args"], toy["train"]
    ref, policy = load_policy(toy["path"], args).eval(), load_policy(toy["path"], args).train()
    batch = alol.take(train, torch.arange(16))
    with torch.no_grad():
        ref_logp = alol.token_logprobs(ref, batch, args)
    logp = alol.token_logprobs(policy, batch, args)
    value = torch.full((16,), 2.0)
    loss, stats = alol.alol_loss(logp, ref_logp, batch["response_mask"], batch["reward"], value, "a_lol", 0.2, return_stats=True)
    assert stats["ratio"] == pytest.approx(1.0, abs=1e-6) and stats["clip_frac"] == 0.0
    nll = -(logp * batch["response_mask"]).sum(-1)
    assert loss.item() == pytest.approx(((batch["reward"] - value).clamp(min=0) * nll).mean().item(), rel=1e-6)


class GradientRecorder:
    """Stands in for the optimiser: keeps the gradients train_step hands to step()."""

    def __init__(self, params):
        self.params = list(params)

    def step(self):
        self.grads = torch.cat([p.grad.flatten() for p in self.params])

    def zero_grad(self, set_to_none):
        for p in self.params:
            p.grad = None


def forward(policy, args):
    """train_step's forward(batch) -> token log-probs, as train_policy builds it."""
    return distributed.data_parallel(policy, lambda model, batch: alol.token_logprobs(model, batch, args), args.device)


def frozen_quantities(ref, tok, train, val, reward_fn, args):
    """The frozen reference's quantities through the cache, as main computes them."""
    return caches.frozen(ref, train, alol.encode(val, tok, args), reward_fn, args,
                         lambda: alol.frozen_quantities(ref, tok, train, val, reward_fn, args))


def test_gradient_accumulation_matches_one_big_batch(toy):
    args, train = toy["args"], toy["train"]
    frozen = {"ref_logp": torch.zeros(train["input_ids"].shape), "value": torch.full((len(train["reward"]),), 2.0)}
    grads = {}
    for batch_size, accum in ((8, 1), (1, 8), (2, 4)):
        policy = load_policy(toy["path"], args).train()
        args_i = dataclasses.replace(args, batch_size=batch_size, grad_accum=accum, max_grad_norm=1e9)
        optim = GradientRecorder(policy.parameters())
        alol.train_step(forward(policy, args_i), optim, train, torch.arange(8), "a_lol", args_i, frozen)
        grads[batch_size] = optim.grads
        assert all(p.grad is None for p in policy.parameters())  # zeroed for the next step
    assert grads[8].abs().sum() > 0
    assert torch.allclose(grads[1], grads[8], atol=1e-6, rtol=1e-5)
    assert torch.allclose(grads[2], grads[8], atol=1e-6, rtol=1e-5)


# ---- 5/6. value head, cache, sampling --------------------------------------------------------------------------
def test_value_head_ignores_padding():
    torch.manual_seed(0)
    head = alol.ValueHead(32, 5.0).eval()
    hidden, mask = torch.randn(3, 10, 32), torch.zeros(3, 10, dtype=torch.bool)
    mask[0, :4], mask[1, :10], mask[2, :1] = True, True, True
    value = head(hidden, mask)
    changed = torch.where(mask[..., None], hidden, torch.randn(3, 10, 32) * 100)
    assert torch.allclose(head(changed, mask), value, atol=1e-6)
    assert torch.allclose(head(hidden[:1, :4], mask[:1, :4]), value[:1], atol=1e-6)  # alone, unpadded
    assert ((value > 0) & (value < 5)).all()


def test_frozen_quantities_cache(toy, tmp_path):
    args, train, tok = toy["args"], toy["train"], toy["tok"]
    args = dataclasses.replace(args, cache_dir=str(tmp_path))
    ref = load_policy(toy["path"], args).eval()
    first = frozen_quantities(ref, tok, train, toy["splits"]["val"], tasks.toy.toy_reward, args)
    assert len(os.listdir(tmp_path)) == 1
    cached = frozen_quantities(ref, tok, train, toy["splits"]["val"], tasks.toy.toy_reward, args)
    assert torch.equal(cached["ref_logp"], first["ref_logp"]) and torch.equal(cached["value"], first["value"])
    idx = torch.arange(0, len(train["reward"]), 7)
    with torch.no_grad():
        fresh = alol.token_logprobs(ref, alol.take(train, idx), args)
    assert torch.allclose(cached["ref_logp"][idx, :fresh.shape[1]], fresh, atol=1e-5)
    assert (cached["ref_logp"] != 0).sum() == train["response_mask"].sum()
    for setting, value in (("value_samples", 3), ("bf16", False)):  # V's data; the log-probs' precision on CUDA
        changed = dataclasses.replace(args, **{setting: value})
        assert frozen_quantities(ref, tok, train, toy["splits"]["val"], tasks.toy.toy_reward, changed)["key"] != first["key"]
    with torch.no_grad():
        ref.transformer.wte.weight[0, 0] += 1.0  # a different reference model
    assert frozen_quantities(ref, tok, train, toy["splits"]["val"], tasks.toy.toy_reward, args)["key"] != first["key"]
    assert len(os.listdir(tmp_path)) == 4


def test_cache_key_covers_the_batches_of_v_samples(toy, tmp_path, capsys):
    """V's targets are sampled in --eval-batch-size batches, so another batch size draws other samples: it must not
    get the V cached for the first one."""
    args, tok = dataclasses.replace(toy["args"], cache_dir=str(tmp_path)), toy["tok"]
    ref = load_policy(toy["path"], args).eval()
    train, val = alol.take(toy["train"], torch.arange(24)), toy["splits"]["val"][:20]
    first = frozen_quantities(ref, tok, train, val, tasks.toy.toy_reward, args)
    small = dataclasses.replace(args, eval_batch_size=7)
    other = frozen_quantities(ref, tok, train, val, tasks.toy.toy_reward, small)
    assert "computed and cached" in capsys.readouterr().out.splitlines()[-1]
    assert other["key"] != first["key"] and len(os.listdir(tmp_path)) == 2
    assert not torch.equal(other["value"], first["value"])  # what a shared key would have hidden


def test_cache_key_follows_the_reward_code_not_its_file(toy, tmp_path, monkeypatch, capsys):
    """An edit elsewhere in the reward function's file keeps the cache; an edit to the function, to a function it
    calls or to a constant it reads computes V anew."""
    args, tok = dataclasses.replace(toy["args"], cache_dir=str(tmp_path / "cache")), toy["tok"]
    ref = load_policy(toy["path"], args).eval()
    train, val = alol.take(toy["train"], torch.arange(24)), toy["splits"]["val"][:20]
    source = ("import torch\n\nSCALE = 0.5\n\n\ndef helper(r):\n    return SCALE * min(len(r.split()), 2) / 2\n\n\n"
              "def score(prompts, responses):\n    return {'short': torch.tensor([helper(r) for r in responses])}\n\n\n"
              "def unrelated():\n    return 1\n")
    module_path = tmp_path / "edited_rewards.py"
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # each reload compiles the edited source
    keys = []
    for old, new in [("", ""), ("return 1\n", "return 10\n"), ("SCALE = 0.5", "SCALE = 0.25"),
                     ("min(len(r.split()), 2) / 2", "min(len(r.split()), 4) / 4")]:
        source = source.replace(old, new) if old else source
        module_path.write_text(source)
        module = importlib.reload(sys.modules["edited_rewards"]) if keys else importlib.import_module("edited_rewards")
        keys.append(frozen_quantities(ref, tok, train, val, module.score, args)["key"])
        assert ("loaded from cache" in capsys.readouterr().out) == (old == "return 1\n")
    assert keys[1] == keys[0] and len(set(keys)) == 3


def test_priority_sampling_keeps_positive_advantages_only():
    advantage = torch.tensor([-1.0, 0.0, 1.0, 3.0, -0.5, 0.5])
    schedule = alol.sampling_schedule(6, advantage.clamp(min=0), epochs=4000, per_step=3, seed=0)
    assert schedule.shape == (4000, 3)  # 3 kept examples, 3 per step: one step per epoch
    counts = torch.bincount(schedule.flatten(), minlength=6).float()
    assert counts[[0, 1, 4]].sum() == 0
    assert torch.allclose(counts[[2, 3, 5]] / counts.sum(), torch.tensor([1 / 4.5, 3 / 4.5, 0.5 / 4.5]), atol=0.01)
    again = alol.sampling_schedule(6, advantage.clamp(min=0), epochs=4000, per_step=3, seed=0)
    assert torch.equal(schedule, again)


def test_uniform_schedule_is_shuffled_epochs():
    schedule = alol.sampling_schedule(10, None, epochs=3, per_step=4, seed=1)
    assert schedule.shape == (9, 4)
    assert sorted(schedule.flatten()[:10].tolist()) == list(range(10))  # the first epoch is a permutation
    tiny = alol.sampling_schedule(5, None, epochs=3, per_step=8, seed=1)  # a batch larger than the data
    assert tiny.shape == (3, 8) and sorted(tiny.flatten()[:5].tolist()) == list(range(5))


def test_main_samples_baselines_by_reward_as_the_official_ts(toy, tmp_path, monkeypatch):
    """--priority-sampling is the official -ts on every method: main hands wbc, r_gold and r_lol P ~ R, the A-LoL
    variants P ~ A+, nll, dpo and pro none (shuffled epochs). The baselines' draw counts then follow P ~ R: Pearson's statistic
    over the N examples is chi-square with N-1 degrees of freedom (every expected count >= 20), so it stays below the
    1e-6 upper quantile unless the draws follow another law."""
    from scipy.stats import chi2

    real, seen = alol.train_policy, {}

    def spy(*a, **kw):
        bound = inspect.signature(real).bind(*a, **kw).arguments
        if os.path.basename(bound["run_dir"]) == "reference":
            return real(*a, **kw)
        seen[bound["algo"]] = (bound.get("priority"), bound["data"]["reward"], bound["frozen"]["value"])
        return None  # the methods' training is not what is tested here

    monkeypatch.setattr(alol, "train_policy", spy)
    alol.main(small_args(tmp_path, "--algo", "all", "--n-train", "48", "--report-to", "none"))
    assert set(seen) == set(alol.ALGOS + alol.PAIR_ALGOS)  # the toy has pairs: `all` adds dpo and pro
    for algo, (priority, reward, value) in seen.items():
        if algo in ("nll", *alol.PAIR_ALGOS):  # uniform: shuffled epochs
            assert priority is None, algo
        else:
            assert torch.equal(priority, (reward - value).clamp(min=0) if algo.startswith("a_lol") else reward), algo
    reward = seen["wbc"][1]  # (N,) R of the toy's five components, in [0, 5]
    p = reward / reward.sum()
    draws = math.ceil(20 / p[p > 0].min().item())
    schedule = alol.sampling_schedule(len(p), reward, epochs=math.ceil(draws / len(p)), per_step=len(p), seed=3)
    counts = torch.bincount(schedule.flatten(), minlength=len(p)).double()
    expected = counts.sum() * p.double()
    assert (counts[p == 0] == 0).all()
    statistic = ((counts - expected)[p > 0] ** 2 / expected[p > 0]).sum().item()
    assert statistic < chi2.ppf(1 - 1e-6, int((p > 0).sum()) - 1), statistic
    assert not alol.parse_args(["--no-priority-sampling"]).priority_sampling


# ---- 8. resume ------------------------------------------------------------------------------------------------
def test_resume_reproduces_uninterrupted_weights(toy, tmp_path, monkeypatch):
    args, train, tok = toy["args"], toy["train"], toy["tok"]
    args = dataclasses.replace(args, save_every=2, batch_size=16)
    data = alol.take(train, torch.arange(64))  # its first 64 examples (and their pairs)
    full = load_policy(toy["path"], args)
    alol.train_policy(full, tok, data, "nll", str(tmp_path / "full"), args, 2, 1e-3)

    real, calls = alol.train_step, []

    def crash_on_fifth_step(*a, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(alol, "train_step", crash_on_fifth_step)
    with pytest.raises(KeyboardInterrupt):
        alol.train_policy(load_policy(toy["path"], args), tok, data, "nll", str(tmp_path / "cut"), args, 2, 1e-3)
    monkeypatch.setattr(alol, "train_step", real)
    assert torch.load(tmp_path / "cut" / "checkpoint" / "trainer_state.pt", weights_only=True)["step"] == 4
    with open(tmp_path / "cut" / "log.jsonl", "a") as log:
        log.write('{"step": 5, "lo')  # a line cut short by the kill
    resumed_args = dataclasses.replace(args, resume=True)
    resumed = load_policy(toy["path"], args)
    alol.train_policy(resumed, tok, data, "nll", str(tmp_path / "cut"), resumed_args, 2, 1e-3)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    steps = [json.loads(line)["step"] for line in open(tmp_path / "cut" / "log.jsonl")]
    assert steps == list(range(1, 9))


# ---- 1/2/10. user-facing errors --------------------------------------------------------------------------------
def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


GOOD = {"prompt": "r/pets : any tips for cats ?", "response": "good luck !", "reward": 1.5}


@pytest.mark.parametrize("bad,message", [
    ('{"prompt": "a", "response": ', r"train\.jsonl:3: not valid JSON"),
    ({"prompt": "r/pets : hi ?", "reward": 1.0}, r"train\.jsonl:3: missing field 'response'"),
    ({"prompt": "r/pets : hi ?", "response": "  ", "reward": 1.0}, r"train\.jsonl:3: empty 'response'"),
    ({"prompt": "r/pets : hi ?", "response": "ok", "reward": float("nan")}, r"train\.jsonl:3: reward 'reward' is not a finite number"),
    ({"prompt": "r/pets : hi ?", "response": "ok"}, r"train\.jsonl:3: missing field 'reward'"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, bad, message):
    train = write_jsonl(tmp_path / "train.jsonl", [GOOD, "", bad, GOOD])  # line 2 is blank
    other = write_jsonl(tmp_path / "other.jsonl", [GOOD])
    args = small_args(tmp_path, "--train-file", train, "--val-file", other, "--test-file", other)
    with pytest.raises(cli.AlolError, match=message):
        alol.main(args)
    assert not (tmp_path / "run").exists()  # nothing written


def test_missing_data_file(tmp_path):
    other = write_jsonl(tmp_path / "other.jsonl", [GOOD])
    args = small_args(tmp_path, "--train-file", str(tmp_path / "nope.jsonl"), "--val-file", other, "--test-file", other)
    with pytest.raises(cli.AlolError, match=r"--train-file: no such file: .*nope\.jsonl"):
        alol.main(args)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv,message", [(["--algo", "nll,ppo"], "unknown --algo 'ppo'"), (["--task", "chess"], "invalid choice: 'chess'"),
                                          (["--clip-eps", "0"], "--clip-eps must be a finite number > 0"), (["--train-file", "x"], "go together"),
                                          (["--epochs", "0"], "--epochs must be at least 1"),
                                          (["--n-train", "0"], "--n-train must be at least 1")])
def test_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        alol.parse_args(argv)
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit) as exit:
        alol.parse_args(["--help"])
    out = capsys.readouterr().out
    assert exit.value.code == 0
    for f in dataclasses.fields(alol.parse_args([])):
        assert "--" + f.name.replace("_", "-") in out
    assert "A-LoL training:" in out and "--no-priority-sampling" in out


def test_out_dir_holding_another_run(tmp_path):
    args = small_args(tmp_path)
    rundir.prepare(args, {})
    with pytest.raises(cli.AlolError, match="already holds a different run .*seed.*--overwrite"):
        rundir.prepare(small_args(tmp_path, "--seed", "5"), {})
    with pytest.raises(cli.AlolError, match="already holds this run; pass --resume"):
        rundir.prepare(args, {})
    rundir.prepare(small_args(tmp_path, "--resume", "--algo", "all"), {})  # adding methods to the same run is fine
    rundir.prepare(small_args(tmp_path, "--seed", "5", "--overwrite"), {})
    assert json.load(open(tmp_path / "run" / "config.json"))["seed"] == 5
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(cli.AlolError, match="holds files that alol did not write"):
        rundir.prepare(small_args(tmp_path, "--out-dir", str(tmp_path / "precious"), "--overwrite"), {})
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_value_head_needs_two_prompts(tmp_path):
    rows = [{"prompt": "r/pets : any tips for cats ?", "response": r, "reward": 1.0} for r in ["ok", "good luck !"] * 6]
    path = write_jsonl(tmp_path / "one_prompt.jsonl", rows)
    args = small_args(tmp_path, "--train-file", path, "--val-file", path, "--test-file", path)
    with pytest.raises(cli.AlolError, match="2 or more distinct validation prompts"):
        alol.main(args)


def test_all_advantages_non_positive_is_explained(tmp_path):
    rows = [{"prompt": f"r/pets : any tips for {n} ?", "response": "good luck !", "reward": 0.0} for n in ["cats", "dogs", "fish"] * 8]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    args = small_args(tmp_path, "--train-file", train, "--val-file", train, "--test-file", train)
    with pytest.raises(cli.AlolError, match=r"every training advantage A = R - V\(x\) is <= 0"):
        alol.main(args)


# ---- 10. end to end ---------------------------------------------------------------------------------------------
def test_own_jsonl_with_a_hub_style_model_and_reward_fn(toy, tmp_path, monkeypatch):
    """--model PATH (the from_pretrained code path of a hub id), user JSONL and a user reward function."""
    (tmp_path / "my_rewards.py").write_text(
        "import torch\n"
        "def score(prompts, responses):\n"
        "    return {'short': torch.tensor([1.0 / (1 + len(r.split())) for r in responses]),\n"
        "            'polite': torch.tensor([float('please' in r) for r in responses])}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = [{"prompt": p, "response": r, "rewards": {"short": s, "polite": q}}
            for p, r, s, q in [("hi there", "please sit", 0.33, 1.0), ("how are you", "fine thanks a lot", 0.2, 0.0)] * 12]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    args = small_args(tmp_path, "--train-file", path, "--val-file", path, "--test-file", path, "--model", toy["path"],
                      "--reward-fn", "my_rewards:score", "--algo", "a_lol,a_lol_seq")
    results = alol.main(args)
    assert set(results["data"]["components"]) == {"short", "polite"}
    assert results["data"]["reward"] == pytest.approx(0.5 * (1.33 + 0.2))
    assert set(results["methods"]) == {"a_lol", "a_lol_seq"}
    run = tmp_path / "run"
    assert os.path.exists(run / "a_lol" / "checkpoint" / "model.safetensors") and os.path.exists(run / "results.png")


E2E = ["--device", "cpu", "--kernel", "torch", "--n-train", "3000", "--n-test", "200", "--ref-epochs", "3", "--epochs",
       "2", "--value-epochs", "10", "--report-to", "none"]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """A reduced budget of the default run (its reference and cache serve the LoRA test too)."""
    tmp = tmp_path_factory.mktemp("e2e")
    return tmp, alol.main(alol.parse_args([*E2E, "--out-dir", str(tmp / "run"), "--cache-dir", str(tmp / "cache")]))


def test_end_to_end_a_lol_beats_nll(e2e):
    """A-LoL must beat continued NLL and the offline data it learned from."""
    tmp_path, results = e2e
    saved = json.load(open(tmp_path / "run" / "results.json"))
    for name in ("reference", "nll", "a_lol"):
        entry = saved["reference"] if name == "reference" else saved["methods"][name]
        assert {"reward_sampled", "reward_greedy", "components", "distinct_1", "distinct_2", "length"} <= set(entry)
    nll, a_lol = results["methods"]["nll"]["reward_sampled"], results["methods"]["a_lol"]["reward_sampled"]
    assert a_lol > nll + 0.5, (a_lol, nll)
    assert a_lol > results["data"]["reward"] + 0.3, (a_lol, results["data"]["reward"])
    assert "| a_lol |" in open(tmp_path / "run" / "results.md").read()


def test_lora_methods_on_the_reference_still_beat_nll(e2e):
    """Fresh rank-16 LoRA adapters (peft) on the same reference: A-LoL still clears the bar over continued NLL, the
    checkpoints hold adapters only, and the merged method loads with from_pretrained."""
    tmp_path, _ = e2e
    args = alol.parse_args([*E2E, "--out-dir", str(tmp_path / "lora"), "--cache-dir", str(tmp_path / "cache"),
                            "--ref-model", str(tmp_path / "run" / "reference" / "checkpoint"), "--lora-r", "16",
                            "--lora-alpha", "32", "--lr", "1e-2"])
    results = alol.main(args)
    nll, a_lol = results["methods"]["nll"]["reward_sampled"], results["methods"]["a_lol"]["reward_sampled"]
    assert a_lol > nll + 0.5, (a_lol, nll)
    checkpoint = tmp_path / "lora" / "a_lol" / "checkpoint"
    assert (checkpoint / "adapter_model.safetensors").exists() and not (checkpoint / "model.safetensors").exists()
    load_policy(str(tmp_path / "lora" / "a_lol" / "model"), args)


def test_no_definition_uses_a_later_one():
    """alol.py reads top to bottom in the order it runs: no top-level definition (function, class, constant) names
    one defined further down, in any section, main included; and its numbered sections are 1, 2, ... in order."""
    source = open(alol.__file__).read()
    assert [int(n) for n in re.findall(r"^# (\d+)\. ", source, flags=re.M)] == list(range(1, 10))
    tree = ast.parse(source)
    defined = {}
    for node in tree.body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else [
            t.id for t in getattr(node, "targets", [getattr(node, "target", None)]) if isinstance(t, ast.Name)]
        defined.update({name: node.lineno for name in names if name not in defined})
    assert defined["alol_loss"] < defined["train_step"] < defined["main"]
    later = [f"line {name.lineno}: {name.id} (defined at line {defined[name.id]})" for node in tree.body
             for name in ast.walk(node) if isinstance(name, ast.Name) and defined.get(name.id, 0) > node.lineno]
    assert later == []


def test_import_alol_only_defines():
    """`import alol` builds no data, registers nothing with transformers and imports no task: a fresh interpreter
    that imports it has none of these afterwards."""
    code = ("import sys, transformers, alol, tasks; "
            "from transformers.models.auto.configuration_auto import CONFIG_MAPPING; "
            "print(sorted(m for m in sys.modules if m.removeprefix('tasks.') in tasks.NAMES or m == 'reward_models'), "
            "'gpt_neox_reward_model' in CONFIG_MAPPING)")
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(alol.__file__), capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[] False"


def test_modules_never_import_alol():
    """Imports run one way: alol.py imports tasks/ and the run machinery, neither of which imports alol.py."""
    root = os.path.dirname(alol.__file__)
    modules = [f for f in os.listdir(root) if f.endswith(".py") and f != "alol.py"]
    modules += [os.path.join("tasks", f) for f in os.listdir(os.path.join(root, "tasks")) if f.endswith(".py")]
    assert {"cli.py", "rundir.py", "checkpoints.py", "caches.py", os.path.join("tasks", "toy.py")} <= set(modules)
    importers = [f for f in modules if re.search(r"^\s*(import alol\b|from alol import)",
                                                  open(os.path.join(root, f)).read(), flags=re.M)]
    assert importers == []


def test_code_fingerprint_of_functions_without_a_source_file_and_of_callable_objects():
    """Stable for the same code (a cache or a --resume fingerprint must match next time), different for other code."""
    made = [{} for _ in range(3)]
    for ns, body in zip(made, ["0.5", "0.5", "0.25"]):
        exec(f"import torch\ndef score(p, r):\n    return {{'a': torch.full((len(r),), {body})}}\n", ns)
    keys = [caches.code_fingerprint(ns["score"]) for ns in made]
    assert keys[0] == keys[1] != keys[2]

    class Scorer:
        def __call__(self, prompts, responses):
            return {"a": torch.zeros(len(responses))}

    assert caches.code_fingerprint(Scorer()) == caches.code_fingerprint(Scorer()) != keys[0]


def test_alol_py_stays_the_algorithm():
    """The promise to students: alol.py is the algorithm alone, about 600 lines (650 with the preference losses);
    task recipes go to tasks/ and run machinery to its modules, not here."""
    source = open(alol.__file__).read()
    assert len(source.splitlines()) <= 650 and len(source.encode()) <= 52 * 1024
