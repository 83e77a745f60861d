"""The preference baselines dpo and pro (alol.pair_loss) against the official code, and their pairs through the
pipeline. tests/vectors/dpo_*.json and pro_*.json hold seeded random inputs and the outputs of the official
`dpo_loss` (dpo_qlora_llama_hh.py:195-228) and PRO's loss lines (pro_qlora_llama_hh.py:438-460) of
abaheti95/LoL-RL @ 9f8d816, run in float64 outside this repository: the facts, not the code."""
import dataclasses
import json
import math
import pathlib

import pytest
import torch

import alol
import caches
import checks
import cli
import models
import tasks.toy

VECTORS = pathlib.Path(__file__).resolve().parent / "vectors"
# float64 carries 53 bits (unit roundoff 1.1e-16); the official and this code differ only in the order of a few
# roundings on values below 1e3 (PRO: log-sum-exp against log of a sum of exp), so 1e-12 leaves a margin of 10x.
TOL = 1e-12


def read(path):
    return json.loads(path.read_text())


def masked_sums(token_logps, mask):
    """Sequence log-probs sum_t m_t logp_t; padded slots hold junk in the vectors and must not matter."""
    return token_logps.masked_fill(~mask.bool(), 0.0).sum(-1)


@pytest.mark.parametrize("path", sorted(VECTORS.glob("dpo_*.json")), ids=lambda p: p.stem)
def test_dpo_equals_the_official_dpo_loss(path):
    v = read(path)
    beta, free, b = v["config"]["beta"], v["config"]["reference_free"], v["config"]["batch_size"]
    token_logps = torch.tensor(v["inputs"]["policy_token_logps"], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor(v["inputs"]["response_mask"])
    policy = masked_sums(token_logps, mask)  # rows 0..B-1 chosen, B..2B-1 rejected, as the official batch
    ref = masked_sums(torch.tensor(v["inputs"]["reference_token_logps"], dtype=torch.float64), mask)
    logp, ref_logp = torch.stack([policy[:b], policy[b:]], 1), torch.stack([ref[:b], ref[b:]], 1)  # (B, 2)
    loss, stats = alol.pair_loss(logp, ref_logp, None, None, "dpo", beta, free, return_stats=True)
    out = v["outputs"]
    assert abs(loss.item() - out["loss"]) <= TOL
    loss.backward()
    official_grad = torch.tensor(out["grad_loss_wrt_policy_token_logps"], dtype=torch.float64)
    assert (token_logps.grad - official_grad).abs().max() <= TOL
    for i in range(b):  # per pair
        assert abs(alol.pair_loss(logp[i:i + 1], ref_logp[i:i + 1], None, None, "dpo", beta, free).item()
                   - out["losses"][i]) <= TOL
    assert abs(stats["margin"] - sum(out["margins"]) / b) <= TOL
    assert stats["pair_acc"] == pytest.approx(sum(out["reward_accuracies"]) / b, abs=1e-7)  # a float32 share


def pro_inputs(v):
    token_logps = torch.tensor(v["inputs"]["token_logps"], dtype=torch.float64)
    mask = torch.tensor(v["inputs"]["response_mask"])
    logp = masked_sums(token_logps, mask).requires_grad_()  # (B, n), every reply token scored
    return logp, mask.sum(-1), torch.tensor(v["inputs"]["rewards"], dtype=torch.float64)


PRO = sorted(VECTORS.glob("pro_*.json"))
# alol's PRO trains reply 0, the preferred one (the official sft_index, 0 in PRO's HH data); the other files differ
# only there, so their ranking terms are checked alone.
SFT_COMPARABLE = [p for p in PRO if read(p)["config"]["sft_weight"] == 0 or not any(read(p)["inputs"]["sft_index"])]


def test_the_vectors_cover_n_2_3_4_ties_and_unsorted_rewards():
    assert {read(p)["config"]["n"] for p in SFT_COMPARABLE} == {2, 3, 4}
    rewards = [row for p in PRO for row in read(p)["inputs"]["rewards"]]
    assert any(r[0] < r[1] for r in rewards) and any(r[0] == r[1] for r in rewards)
    assert any(read(p)["config"]["reference_free"] for p in VECTORS.glob("dpo_*.json"))
    assert any(len(set(read(p)["derived"]["chosen_lengths"] + read(p)["derived"]["rejected_lengths"])) > 1
               for p in VECTORS.glob("dpo_*.json"))


@pytest.mark.parametrize("path", PRO, ids=lambda p: p.stem)
def test_pro_ranking_terms_equal_the_official_loss_lines(path):
    v = read(path)
    logp, length, reward = pro_inputs(v)
    out = v["outputs"]
    assert abs(alol.pair_loss(logp, None, length, reward, "pro", sft_weight=0.0).item() - out["ranking_loss"]) <= TOL
    for i in range(len(reward)):  # per prompt: the sum of its stages' terms
        one = alol.pair_loss(logp[i:i + 1], None, length[i:i + 1], reward[i:i + 1], "pro", sft_weight=0.0).item()
        assert abs(one - sum(stage[i] for stage in out["ranking_loss_per_stage_per_example"])) <= TOL


@pytest.mark.parametrize("path", SFT_COMPARABLE, ids=lambda p: p.stem)
def test_pro_equals_the_official_combined_loss_and_gradient(path):
    v = read(path)
    logp, length, reward = pro_inputs(v)
    loss = alol.pair_loss(logp, None, length, reward, "pro", sft_weight=v["config"]["sft_weight"])
    assert abs(loss.item() - v["outputs"]["combined_loss"]) <= TOL
    loss.backward()
    official_grad = torch.tensor(v["outputs"]["grad_combined_wrt_sum_logps"], dtype=torch.float64)
    assert (logp.grad - official_grad).abs().max() <= TOL


def test_pro_log_sum_exp_does_not_overflow_where_plain_exp_does():
    """float32, a reward gap of 10 against the order (tau < 0) and mean log-probs of -10: s * tau = 100 > 88.7, where
    the official plain exp() is inf. The log-sum-exp gives the exact value, log 2 (its two terms are equal)."""
    logp, reward = torch.tensor([[-10.0, -10.0]], requires_grad=True), torch.tensor([[0.0, 10.0]])
    assert torch.isinf(torch.exp(logp[:, 1] * (reward[:, 0] - reward[:, 1])))  # what the official line computes
    loss = alol.pair_loss(logp, None, torch.tensor([[1, 1]]), reward, "pro", sft_weight=0.0)
    loss.backward()
    # log-sum-exp(100, 100, log eps) - 100 in float32: two roundings of 1 ulp at 100 (2^-17 each)
    assert loss.item() == pytest.approx(math.log(2), abs=2 * 2**-17) and torch.isfinite(logp.grad).all()


# ---- the pairs through the pipeline --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pairs")
    args = alol.parse_args(["--device", "cpu", "--kernel", "torch", "--n-train", "48", "--n-val", "8", "--n-test", "4",
                            "--batch-size", "12", "--cache-dir", str(tmp / "cache")])
    torch.manual_seed(0)
    splits, reward_fn = tasks.toy.load(args)
    tok = models.bpe_tokenizer(splits["train"])
    model = alol.disable_dropout(models.tiny_gpt2(tok, args))  # dropout off, as in every pass of alol
    return {"args": args, "splits": splits, "reward_fn": reward_fn, "tok": tok, "model": model}


def test_toy_train_examples_carry_a_scored_second_reply(pairs):
    train, reward_fn = pairs["splits"]["train"], pairs["reward_fn"]
    assert all(set(r["rejected"]) == {"response", "rewards"} for r in train)
    second = reward_fn([r["prompt"] for r in train], [r["rejected"]["response"] for r in train])
    assert all(r["rejected"]["rewards"] == {k: v[i].item() for k, v in second.items()} for i, r in enumerate(train))
    assert sum(r["rejected"]["response"] != r["response"] for r in train) > len(train) // 2
    assert not any("rejected" in r for split in ("val", "test") for r in pairs["splits"][split])


def swapped(records):
    """The same pairs with the data's reply and the rejected one exchanged."""
    return [{**r, "response": r["rejected"]["response"], "rewards": r["rejected"]["rewards"],
             "rejected": {"response": r["response"], "rewards": r["rewards"]}} for r in records]


@pytest.mark.parametrize("algo", ["dpo", "pro"])
def test_the_preferred_reply_is_the_one_with_the_higher_reward(pairs, algo):
    """train_step ranks each pair by reward: its loss is pair_loss on (higher, lower), whichever reply the data
    lists first, so exchanging the two replies of every pair changes nothing."""
    args, tok, model = pairs["args"], pairs["tok"], pairs["model"]
    records = pairs["splits"]["train"][:12]
    assert len({sum(r["rewards"].values()) > sum(r["rejected"]["rewards"].values()) for r in records}) == 2
    idx = torch.arange(len(records))
    losses = []
    for recs in (records, swapped(records)):
        data = alol.encode(recs, tok, args)
        with torch.no_grad():  # a reference other than the policy, so that DPO's loss is not log 2 everywhere
            frozen = {k: 0.5 * alol.token_logprobs(model, alol.take(d, idx), args)
                      for k, d in (("ref_logp", data), ("ref_logp_rejected", data["rejected"]))}
        seq = [alol.token_logprobs(model, alol.take(d, idx), args).sum(-1).detach() for d in (data, data["rejected"])]
        ref = [frozen[k].sum(-1) for k in ("ref_logp", "ref_logp_rejected")]
        reward = [data["reward"], data["rejected"]["reward"]]
        length = [data["response_mask"].sum(-1), data["rejected"]["response_mask"].sum(-1)]
        first = (reward[0] >= reward[1])[:, None]  # the data's reply earns at least as much: it is preferred
        expected = alol.pair_loss(*[torch.where(first, torch.stack(x, 1), torch.stack(x[::-1], 1))
                                    for x in (seq, ref, length, reward)], algo)
        forward = alol.data_parallel(model, lambda m, batch: alol.token_logprobs(m, batch, args), "cpu")
        stats = alol.train_step(forward, torch.optim.SGD(model.parameters(), lr=0.0), data, idx, algo, args, frozen)
        assert stats["loss"] == pytest.approx(expected.item(), rel=1e-6)  # fp32 sums of the same numbers
        assert "ratio" not in stats and "adv" not in stats and "pair_acc" in stats
        losses.append(stats["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_the_cache_key_covers_the_rejected_replies(pairs, tmp_path):
    args, tok, model = dataclasses.replace(pairs["args"], cache_dir=str(tmp_path)), pairs["tok"], pairs["model"]
    train_records, val = pairs["splits"]["train"][:6], alol.encode(pairs["splits"]["val"], tok, args)
    other = [{**r, "rejected": {**r["rejected"], "response": "ok"}} for r in train_records]
    for records in (train_records, other, [{k: v for k, v in r.items() if k != "rejected"} for r in train_records]):
        caches.frozen(model, alol.encode(records, tok, args), val, pairs["reward_fn"], args,
                      lambda: {"x": torch.ones(1)})
    assert len(list(tmp_path.glob("frozen-*.pt"))) == 3


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


ROW = {"prompt": "r/pets : any tips for cats ?", "response": "good luck !", "rewards": {"a": 0.5, "b": 1.0}}


def test_jsonl_reads_an_optional_rejected_reply(tmp_path):
    rows = [ROW, {**ROW, "rejected": {"response": "ok", "rewards": {"a": 0.0, "b": 0.25}}}]
    records = checks.read_jsonl(write_jsonl(tmp_path / "d.jsonl", rows), "--train-file")
    assert "rejected" not in records[0]
    assert records[1]["rejected"] == {"response": "ok", "rewards": {"a": 0.0, "b": 0.25}}
    one = {"prompt": "p", "response": "r", "reward": 0.5, "rejected": {"response": "s", "reward": 0}}
    assert checks.read_jsonl(write_jsonl(tmp_path / "e.jsonl", [one]), "x")[0]["rejected"]["rewards"] == {"reward": 0}


@pytest.mark.parametrize("rejected", ["ok", {"rewards": {"a": 0.0, "b": 0.0}},
                                      {"response": " ", "rewards": {"a": 0, "b": 0}}, {"response": "ok"},
                                      {"response": "ok", "rewards": {"a": 0.0}},
                                      {"response": "ok", "rewards": {"a": True, "b": 0.0}},
                                      {"response": "ok", "rewards": {"a": "0.5", "b": 0.0}}])
def test_jsonl_refuses_a_bad_rejected_reply_naming_the_line(tmp_path, rejected):
    path = write_jsonl(tmp_path / "d.jsonl", [ROW, {**ROW, "rejected": rejected}])
    with pytest.raises(cli.AlolError, match=r"d\.jsonl:2: 'rejected' must be .*\['a', 'b'\]"):
        checks.read_jsonl(path, "--train-file")


@pytest.mark.parametrize("algo", ["dpo", "pro", "a_lol,pro"])
def test_pair_methods_refuse_data_without_pairs_before_anything_is_written(tmp_path, algo):
    rows = [{"prompt": f"r/pets : any tips for {n} ?", "response": "good luck !", "reward": 1.0}
            for n in ["cats", "dogs"] * 4]
    rows[0] = {**rows[0], "rejected": {"response": "ok", "reward": 0.5}}  # pairs on some rows only: not enough
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    args = alol.parse_args(["--device", "cpu", "--train-file", path, "--val-file", path, "--test-file", path, "--algo",
                            algo, "--out-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")])
    with pytest.raises(cli.AlolError, match=rf"^--algo {algo.split(',')[-1]} trains on pairs of replies: 7 of the 8 "
                                             r"training examples have no dispreferred reply"):
        alol.main(args)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("paired", [True, False])
def test_all_means_the_methods_the_data_supports(tmp_path, monkeypatch, paired):
    """--algo all: dpo and pro join the eight where every training example has a pair, and are left out (not
    refused) where none has."""
    pair = {"rejected": {"response": "ok", "reward": 0.5}} if paired else {}
    rows = [{"prompt": f"r/pets : any tips for {n} ?", "response": "good luck !", "reward": 1.0, **pair}
            for n in ["cats", "dogs"] * 4]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    seen = []

    def stop(args, splits, reward_fn, tok, model, pair_algos=()):  # stands in for the checks: methods resolved
        seen.append(list(pair_algos))
        raise cli.AlolError("stopped")

    monkeypatch.setattr(checks, "preflight", stop)
    args = alol.parse_args(["--device", "cpu", "--train-file", path, "--val-file", path, "--test-file", path,
                            "--algo", "all", "--out-dir", str(tmp_path / "run")])
    with pytest.raises(cli.AlolError, match="stopped"):
        alol.main(args)
    assert seen == [["dpo", "pro"] if paired else []]


def test_preference_settings_are_checked(capsys):
    for argv, message in [(["--dpo-beta", "0"], "--dpo-beta must be a finite number > 0"),
                          (["--pro-sft-weight", "-1"], "--pro-sft-weight must be a finite number >= 0"),
                          (["--algo", "dpo,dop"], "unknown --algo 'dop'")]:
        with pytest.raises(SystemExit):
            alol.parse_args(argv)
        assert message in capsys.readouterr().err


def test_end_to_end_dpo_and_pro_beside_a_lol(tmp_path):
    """A short toy run: both methods train from the same reference and cached pass (which now holds the rejected
    replies' log-probs), log their own statistics and no fake ratio or advantage, and appear in every output."""
    args = alol.parse_args(["--device", "cpu", "--kernel", "torch", "--n-train", "300", "--n-val", "40", "--n-test",
                            "20", "--value-samples", "2", "--value-epochs", "2", "--ref-epochs", "1", "--epochs", "1",
                            "--batch-size", "16", "--eval-max-new-tokens", "8", "--report-to", "none",
                            "--algo", "a_lol,dpo,pro", "--out-dir", str(tmp_path / "run"),
                            "--cache-dir", str(tmp_path / "cache")])
    results = alol.main(args)
    assert list(results["methods"]) == ["a_lol", "dpo", "pro"]
    run = tmp_path / "run"
    table = (run / "results.md").read_text()
    assert "| dpo |" in table and "| pro |" in table
    for algo, keys in (("pro", {"pair_acc"}), ("dpo", {"pair_acc", "margin"})):
        rows = [json.loads(line) for line in open(run / algo / "log.jsonl")]
        assert all(keys <= set(r) and not {"ratio", "clip_frac", "adv"} & set(r) for r in rows)
    assert sum(r["pair_acc"] for r in rows[-5:]) / 5 > 0.6  # DPO learns to rank its training pairs (from ~0 at step 1)
    cached = torch.load(next((tmp_path / "cache").glob("frozen-*.pt")), weights_only=True)
    assert cached["ref_logp_rejected"].shape[0] == cached["ref_logp"].shape[0] == 300
    assert (run / "curves.png").stat().st_size > 20_000
