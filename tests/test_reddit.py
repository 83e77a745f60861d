"""The Reddit task offline: tiny CSVs in Kaggle's schema and tiny random models of the paper's classes, saved to a
temporary folder and loaded by path, run through the same code as the hub ids."""
import json
import math
import os
import socket
import time

import pandas as pd
import pytest
import torch
import transformers

import alol
import caches
import checks
import cli
import models
import tasks.reddit

COLUMNS = ["id", "parent_id", "subreddit_id", "link_id", "text", "score", "ups", "author", "controversiality",
           "parent_link_id", "parent_text", "parent_score", "parent_ups", "parent_author", "parent_controversiality"]
LONG_WORDS = " ".join(["zqjvzqjv"] * 90)  # <= 100 words, but bytes the tokenizer never merged: far over 300 tokens


def kaggle_rows(kind, n):
    replies = ["thanks , that helps a lot", "no way that is true", "see   https://example.com/x for more",
               "great point about the game", "i disagree with this completely"]
    rows = [{"parent_text": f"what do you think about topic {i} in {kind} ?", "text": replies[i % len(replies)] + f" {i}"}
            for i in range(n)]
    rows += [{"parent_text": None, "text": "orphan reply"}, {"parent_text": "a parent", "text": None},
             {"parent_text": "too long", "text": " ".join(["word"] * 101)},
             {"parent_text": LONG_WORDS, "text": "short"}]
    return pd.DataFrame([{c: r.get(c, 1 if "score" in c or "ups" in c else "x") for c in COLUMNS} for r in rows])


@pytest.fixture(scope="module")
def reddit(tmp_path_factory):
    """Kaggle-schema CSVs and tiny models: GPT-2 policy, GPT2ForSequenceClassification for DialogRPT,
    RobertaForSequenceClassification for CoLA and for the safety classifier."""
    tmp = tmp_path_factory.mktemp("reddit")
    data = tmp / "data"
    data.mkdir()
    pos, neg = kaggle_rows("pos", 30), kaggle_rows("neg", 30)
    pos.to_csv(data / "comments_positive.csv", index=False)
    neg.to_csv(data / "comments_negative.csv", index=False)
    rows = pd.concat([pos, neg]).dropna(subset=["parent_text", "text"])
    texts = [{"prompt": p, "response": r} for p, r in zip(rows.parent_text, rows.text) if p != LONG_WORDS]
    tok = models.bpe_tokenizer(texts)
    eos = tok.eos_token_id
    gpt2 = dict(vocab_size=len(tok), n_positions=1024, n_embd=32, n_layer=1, n_head=2, bos_token_id=eos, eos_token_id=eos,
                pad_token_id=eos)
    roberta = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                   max_position_embeddings=600, pad_token_id=eos, bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)
    saved = {"policy": transformers.GPT2LMHeadModel(transformers.GPT2Config(**gpt2)),
              "depth": transformers.GPT2ForSequenceClassification(transformers.GPT2Config(**gpt2, num_labels=1)),
              "updown": transformers.GPT2ForSequenceClassification(transformers.GPT2Config(**gpt2, num_labels=1)),
              "fluency": transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**roberta, num_labels=2)),
              "safety": transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
                  **roberta, num_labels=2, id2label={0: "non-offensive", 1: "offensive"}, label2id={"non-offensive": 0, "offensive": 1}))}
    for name, model in saved.items():
        model.save_pretrained(tmp / name)
        tok.save_pretrained(tmp / name)
    flags = ["--model", str(tmp / "policy"), "--fluency-model", str(tmp / "fluency"), "--depth-model", str(tmp / "depth"),
             "--updown-model", str(tmp / "updown"), "--safety-model", str(tmp / "safety")]
    return {"tmp": tmp, "data": data, "tok": tok, "flags": flags}


def reddit_args(reddit, tmp_path, *extra):
    return alol.parse_args(["--task", "reddit", "--data-dir", str(reddit["data"]), *reddit["flags"], "--device", "cpu",
                            "--kernel", "torch", "--out-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
                            "--n-val", "3", "--n-test", "4", "--ref-epochs", "1", "--epochs", "1", "--batch-size", "4",
                            "--value-samples", "1", "--value-epochs", "2", "--eval-max-new-tokens", "6", "--eval-batch-size", "8",
                            *extra])


def test_reddit_preset_is_the_papers():
    args = alol.parse_args(["--task", "reddit"])
    assert (args.model, args.ref_epochs, args.epochs, args.lr, args.batch_size * args.grad_accum) == ("microsoft/DialoGPT-medium", 6, 3, 2e-5, 16)
    assert (args.eval_num_beams, args.eval_repetition_penalty, args.eval_max_new_tokens) == (2, 2.5, 128)
    assert (args.n_val, args.n_test, args.n_train) == (1000, 1000, 0)
    assert alol.parse_args(["--task", "reddit", "--lr", "1e-4"]).lr == 1e-4  # flags still override the preset


def test_preprocessing_filters_and_splits(reddit, tmp_path):
    args = reddit_args(reddit, tmp_path)
    splits = tasks.reddit.reddit_splits(args, reddit["tok"])
    assert splits == tasks.reddit.reddit_splits(args, reddit["tok"])  # deterministic (random_state 901, as the paper)
    assert [len(splits[k]) for k in ("test", "val", "train_pos", "train_neg")] == [8, 6, 23, 23]  # 30 kept per file
    records = [r for split in splits.values() for r in split]
    assert all(r["prompt"].endswith(models.EOS) and models.EOS not in r["response"] for r in records)
    assert all(len(r["response"].split()) <= 100 and "http" not in r["response"] for r in records)
    assert sum("see <URL> for more" in r["response"] for r in records) == 12  # URL replaced, whitespace collapsed
    assert not any(r["response"] in ("orphan reply", "short") or r["prompt"] == "a parent" + models.EOS for r in records)
    assert {r["prompt"] for r in splits["train_pos"]}.isdisjoint(r["prompt"] for r in splits["test"] + splits["val"])
    # in the sampled order: the test split is the head of pandas' sample with the paper's random_state
    order = pd.read_csv(reddit["data"] / "comments_positive.csv", dtype=str).dropna(subset=["parent_text", "text"])
    first = order.sample(n=len(order), random_state=901).parent_text.tolist()
    kept = [p for p in first if p not in ("too long", LONG_WORDS)]
    assert [r["prompt"][:-len(models.EOS)] for r in splits["test"][:4]] == kept[:4]
    capped = tasks.reddit.reddit_splits(reddit_args(reddit, tmp_path, "--n-train", "5"), reddit["tok"])
    assert len(capped["train_pos"]) == 5 and capped["test"] == splits["test"]


def test_urls_replaced_as_the_official_url_regex(reddit, tmp_path):
    """The official url_regex: the ")" or quote after a link stays, a bare www. address is not a URL, and the
    trailing "." of a sentence is taken as part of the link (as the official code does)."""
    cases = {"(see http://foo.com/bar)": "(see <URL>)", '"http://q.com/x" he said': '"<URL>" he said',
             "try www.google.com": "try www.google.com", "see   https://example.com/x for more": "see <URL> for more",
             "read http://x.org/y?q=1&z=2. ok": "read <URL> ok"}
    data = tmp_path / "urls"
    data.mkdir()
    for name in tasks.reddit.REDDIT_FILES.values():
        frame = pd.DataFrame([{c: "x" for c in COLUMNS} | {"parent_text": f"parent {i}", "text": text}
                              for i, text in enumerate(cases)])
        frame.to_csv(data / name, index=False)
    args = reddit_args(reddit, tmp_path, "--data-dir", str(data), "--n-test", "5", "--n-val", "1")
    got = {r["prompt"]: r["response"] for r in tasks.reddit.reddit_splits(args, reddit["tok"])["test"]}
    assert got == {f"parent {i}{models.EOS}": expected for i, expected in enumerate(cases.values())}


def test_tfidf_reward_by_hand():
    """idf = ln((1 + n) / (1 + df)) + 1; tf-idf rows L2-normalised; reward = mean of the k non-zeros * (k/10 if k < 5)."""
    diversity = tasks.reddit.tfidf_reward(["the cat sat", "the dog sat", "a cat ran"])  # 'a' is not a token (2+ chars)
    idf2, idf1 = math.log(4 / 3) + 1, math.log(2) + 1  # document frequency 2 (the, cat, sat) and 1 (dog, ran)
    norm = math.sqrt((2 * idf1) ** 2 + idf1 ** 2)
    five = [idf2] * 3 + [idf1] * 2
    expected = [math.sqrt(0.5) * 2 / 10,  # "the cat": two equal entries
                (2 * idf1 / norm + idf1 / norm) / 2 * 2 / 10,  # "dog dog ran": tf 2 and 1
                0.0,  # "zebra": no known term
                sum(five) / math.sqrt(sum(x * x for x in five)) / 5]  # five terms: no length factor
    got = diversity(["the cat", "dog dog ran", "zebra", "the cat sat dog ran"])
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)


def test_not_offensive_label_from_names():
    config = transformers.RobertaConfig(num_labels=2, id2label={0: "offensive", 1: "not-offensive"})
    assert tasks.reddit.not_offensive_label(config) == 1
    assert tasks.reddit.not_offensive_label(transformers.RobertaConfig(num_labels=2)) == 0  # LABEL_0/1: TweetEval's order
    with pytest.raises(cli.AlolError):
        tasks.reddit.not_offensive_label(transformers.RobertaConfig(num_labels=3))


def test_missing_data_says_what_to_download(tmp_path):
    args = alol.parse_args(["--task", "reddit", "--data-dir", str(tmp_path / "nothing"), "--out-dir", str(tmp_path / "run")])
    with pytest.raises(cli.AlolError, match=r"comments_positive\.csv and comments_negative\.csv.*Kaggle.*kaggle\.com.*nothing"):
        alol.main(args)
    assert not (tmp_path / "run").exists()


def test_unreachable_hub_fails_at_once(reddit, tmp_path, monkeypatch):
    start = time.time()
    with pytest.raises(cli.AlolError, match="not in the Hugging Face cache.*HF_HUB_OFFLINE is set"):
        models.hub_path("nobody/no-such-model")  # the tests run with HF_HUB_OFFLINE=1
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def no_network(address, timeout):
        assert timeout <= 5  # a short probe, not transformers' minute of retries
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    models.hub_unreachable.cache_clear()  # the probe's answer is kept for the run
    with pytest.raises(cli.AlolError, match=r"the hub \(huggingface\.co\) cannot be reached \(Network is unreachable\)"):
        models.hub_path("nobody/no-such-model")
    with pytest.raises(cli.AlolError, match="cannot be reached"):  # the whole run, before anything is written
        alol.main(reddit_args(reddit, tmp_path, "--depth-model", "microsoft/DialogRPT-depth"))
    assert not (tmp_path / "run").exists() and time.time() - start < 30
    models.hub_unreachable.cache_clear()


def test_reachable_hub_gets_the_id_not_a_partial_cache(monkeypatch):
    """When the hub answers, from_pretrained gets the id, so it can fetch files an earlier download lacked."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "hub_unreachable", lambda host: "")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **kw: "/partial/cache/folder")
    assert models.hub_path("microsoft/DialogRPT-depth") == "microsoft/DialogRPT-depth"
    monkeypatch.setattr(models, "hub_unreachable", lambda host: "no route")  # unreachable: the cache is all there is
    assert models.hub_path("microsoft/DialogRPT-depth") == "/partial/cache/folder"


def test_reddit_end_to_end(reddit, tmp_path, monkeypatch, capsys):
    """The whole Reddit path by local paths with a tiny budget: results like the embedded task's; then the cache."""
    results = alol.main(reddit_args(reddit, tmp_path, "--algo", "nll,a_lol"))
    components = {"fluency", "safety", "engagement", "upvotes", "diversity"}
    assert set(results["data"]["components"]) == components == set(results["methods"]["a_lol"]["components"])
    for entry in (results["reference"], results["methods"]["nll"], results["methods"]["a_lol"]):
        assert 0 <= entry["reward_sampled"] <= 5 and 0 <= entry["reward_greedy"] <= 5
        assert {"distinct_1", "distinct_2", "distinct_3", "length"} <= set(entry)
    assert results["n_test"] == 8 and os.path.exists(tmp_path / "run" / "results.png")
    folders = [d for d in os.listdir(reddit["data"]) if d.startswith("alol-")]
    assert len(folders) == 1
    cached = os.path.join(reddit["data"], folders[0])
    assert sorted(os.listdir(cached)) == ["checksums.json", "test.jsonl", "train_neg.jsonl", "train_pos.jsonl", "val.jsonl"]
    assert len(checks.read_jsonl(os.path.join(cached, "train_pos.jsonl"), "x")[0]["rewards"]) == 5  # our own schema

    def must_not_run(*a, **kw):
        raise AssertionError("the cached data should have been read")

    monkeypatch.setattr(tasks.reddit, "reddit_splits", must_not_run)
    monkeypatch.setattr(caches, "add_rewards", must_not_run)
    splits, _ = tasks.reddit.load(reddit_args(reddit, tmp_path))
    assert [r["rewards"] for r in splits["train"]] == [r["rewards"] for r in checks.read_jsonl(os.path.join(cached, "train_pos.jsonl"), "x")]
    neg, _ = tasks.reddit.load(reddit_args(reddit, tmp_path, "--reddit-train", "neg"))  # same cache, the other split
    assert neg["train"] != splits["train"] and neg["test"] == splits["test"]
    monkeypatch.undo()
    with open(os.path.join(cached, "val.jsonl"), "a") as f:  # an altered cache file is never used
        f.write(json.dumps({"prompt": "x", "response": "y", "rewards": splits["val"][0]["rewards"]}) + "\n")
    again, _ = tasks.reddit.load(reddit_args(reddit, tmp_path))
    assert "is incomplete or altered: preparing and scoring it again" in capsys.readouterr().out
    assert [r["prompt"] for r in again["val"]] == [r["prompt"] for r in splits["val"]]
