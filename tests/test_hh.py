"""The HH task offline: a tiny dataset in the layout of the hub's Anthropic/hh-rlhf and tiny random models of the
default classes (a Qwen2 policy, OpenAssistant's GPT-NeoX reward model), saved to a temporary folder and loaded by
path through the same code as the hub ids."""
import gzip
import json
import math
import os
import pathlib
import time

import pytest
import torch
import transformers
from safetensors.torch import load_file

import alol
import caches
import checks
import cli
import models
import reward_models
import tasks.hh
from models import EOS

SYSTEM = tasks.hh.HH_SYSTEM
VECTORS = pathlib.Path(__file__).parent / "vectors"


def conversations(subset, split, n):
    """n chosen/rejected pairs: single- and multi-turn ones, one whose rejected reply is empty (dropped from
    training) and one without "Assistant" (PRO drops it everywhere)."""
    rows = []
    for i in range(n):
        history = "".join(f"\n\nHuman: question {j} about {subset}\n\nAssistant: answer {j}" for j in range(i % 3))
        ask = f"{history}\n\nHuman: {split} {i}: how do I help with {subset}?"
        rows.append({"chosen": f"{ask}\n\nAssistant: Kindly, step by step {i}.",
                     "rejected": f"{ask}\n\nAssistant: " + ("" if i == 1 else f"No way {i}.")})
    rows.append({"chosen": "\n\nHuman: left unanswered", "rejected": "\n\nHuman: left unanswered"})
    return rows


@pytest.fixture(scope="module")
def hh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hh")
    data = tmp / "hh-rlhf"
    texts = []
    for subset in tasks.hh.HH_SUBSETS:
        (data / subset).mkdir(parents=True)
        for split, n in (("train", 6), ("test", 3)):
            rows = conversations(subset, split, n)
            with gzip.open(data / subset / f"{split}.jsonl.gz", "wt") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
            texts += [{"prompt": tasks.hh.prompt_text(p["prefix"]), "response": " ".join(p["suffix"])} for p in
                      (tasks.hh.hub_pair(**row) for row in rows) if p]
    tok = models.bpe_tokenizer(texts + [{"prompt": "<|prompter|><|assistant|>", "response": "No way"}])
    eos = tok.eos_token_id
    torch.manual_seed(0)
    policy = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=eos,
        eos_token_id=eos, pad_token_id=eos))
    reward = reward_models.NeoXRewardModel(reward_models.NeoXRewardConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=1024, eos_token_id=eos, pad_token_id=eos))
    for name, model in {"policy": policy, "reward": reward, "test": reward}.items():
        model.save_pretrained(tmp / name)
        tok.save_pretrained(tmp / name)
    return {"tmp": tmp, "data": data, "tok": tok}


def hh_args(hh, tmp_path, *extra):
    return alol.parse_args(["--task", "hh", "--hh-dataset", str(hh["data"]), "--model", str(hh["tmp"] / "policy"),
                            "--hh-reward-model", str(hh["tmp"] / "reward"), "--hh-test-reward-model",
                            str(hh["tmp"] / "test"), "--device", "cpu", "--kernel", "torch",
                            "--out-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
                            "--n-val", "5", "--n-test", "2", "--ref-epochs", "1", "--epochs", "1", "--batch-size", "4",
                            "--grad-accum", "1", "--value-samples", "1", "--value-epochs", "2",
                            "--eval-max-new-tokens", "6", "--eval-batch-size", "16", *extra])


def test_hh_preset_is_the_papers_settings():
    args = alol.parse_args(["--task", "hh"])
    lengths = (args.max_prompt_len, args.max_response_len, args.eval_max_new_tokens, args.eval_num_beams)
    assert lengths == (640, 128, 128, 1)
    optimiser = (args.batch_size * args.grad_accum, args.max_grad_norm, args.weight_decay, args.adam_eps,
                 args.lr_schedule, args.value_epochs, args.value_lr)
    assert optimiser == (16, 0.3, 0.01, 1e-6, "constant", 10, 1e-5)
    assert (args.eval_stop, args.value_target, args.n_val) == ("###", "greedy", 280) and 0 < args.eval_every < 1
    assert (args.model, args.hh_train, args.hh_reward_model, args.hh_test_reward_model) == (
        "Qwen/Qwen2.5-0.5B", "preferred", "OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5",
        "OpenAssistant/oasst-rm-2-pythia-6.9b-epoch-1")
    assert alol.parse_args(["--task", "hh", "--lr", "3e-5"]).lr == 3e-5


def vectors(name):
    return json.load(open(VECTORS / f"hh_{name}.json"))["vectors"]


@pytest.mark.parametrize("case", vectors("decode_postprocess"), ids=lambda c: repr(c["generated"])[:30])
def test_decoded_reply_is_cut_as_the_official_code_cuts_it(case):
    assert tasks.hh.postprocess(case["generated"]) == case["official"]


@pytest.mark.parametrize("script,task,stop,reply", [
    ("ok ### more words", "hh", "###", "ok"), ("ok ### more words", "hh", "", "ok ### more words"),
    ("ok\nHuman: more words", "hh", "", "ok"), ("ok\nHuman: more words", "toy", "", "ok\nHuman: more words")])
def test_generate_stops_at_the_stop_string_and_applies_the_tasks_cut(hh, script, task, stop, reply):
    """--eval-stop ends a generation at `###` (HH's preset), and the reply is cut by the task's postprocess (HH: at
    a next turn): a policy scripted to say `script`, then EOS."""
    tok, calls = hh["tok"], []
    policy = transformers.AutoModelForCausalLM.from_pretrained(hh["tmp"] / "policy")
    ids = tok(script, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    forward = policy.forward

    def scripted(**kw):  # the next token of the script, whatever the prompt
        out = forward(**kw)
        out.logits[:, -1] = -1e4
        out.logits[:, -1, ids[min(len(calls), len(ids) - 1)]] = 1e4
        calls.append(1)
        return out

    policy.forward = scripted
    args = alol.parse_args(["--task", task, "--device", "cpu", "--eval-max-new-tokens", str(len(ids) + 2),
                            "--eval-stop", stop])
    assert alol.generate(policy, tok, ["hi"], args, sample=False) == [reply]
    assert len(calls) == (len(tok("ok ###", add_special_tokens=False)["input_ids"]) if stop else len(ids))


def rm_lookup(cases, monkeypatch):
    """The reward model replaced by the vectors' given logits, looked up by the official reward-model text: a text
    the official code does not build is a KeyError. Returns the texts scored."""
    logits, scored = {}, []
    for v in cases:
        for text, logit in v:
            assert logits.setdefault(text, logit) == logit

    def classifier_scores(path, texts, args, label=None, pairs=None, max_tokens=None):
        scored.extend(texts)
        return torch.sigmoid(torch.tensor([logits[t] for t in texts]))
    monkeypatch.setattr(reward_models, "classifier_scores", classifier_scores)
    return scored


def test_hub_pairs_processed_as_pro_and_the_official_trainer(hh, tmp_path, monkeypatch):
    """45 tricky hub pairs, side by side with PRO's step 1-2, data_cleaning.py and the official trainer (vectors made
    by running the official functions outside this repository): kept or dropped, prompt, reply, the other reply,
    the re-rank by the reward model, the rewards and the reward model's text. Departures (README): a pair PRO's
    assert aborts on (the whole file) is dropped alone; a training pair with an empty reply is dropped."""
    cases, logits = vectors("hub_pairs"), {}
    for v in cases:
        for text, logit in zip((v["train"]["rm_text"], v["train"]["other_rm_text"]), v["train"]["reward_logits"]) \
                if v["step1"] == "kept" else ():
            logits.setdefault(text, set()).add(logit)
    # Cases that give one text two logits (a reply scored twice) are checked pair by pair only: no model scores so
    some = [v for v in cases if v["step1"] != "kept" or all(len(logits[v["train"][k]]) == 1
                                                          for k in ("rm_text", "other_rm_text"))]
    assert len(some) == len(cases) - 6
    data = tmp_path / "hub"
    for subset in tasks.hh.HH_SUBSETS:
        (data / subset).mkdir(parents=True)
        rows = [v["input"] for v in some] if subset == "helpful-base" else [cases[0]["input"]]
        for split in ("train", "test"):
            with gzip.open(data / subset / f"{split}.jsonl.gz", "wt") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
    kept = [v for v in some if v["step1"] == "kept"]
    scored = rm_lookup([[(v["train"]["rm_text"], v["train"]["reward_logits"][0]),
                         (v["train"]["other_rm_text"], v["train"]["reward_logits"][1])] for v in kept], monkeypatch)
    for v in cases:
        assert tasks.hh.split_dialogue(v["input"]["chosen"]) == v["split_dialogue"]["chosen"], v["id"]
        assert tasks.hh.split_dialogue(v["input"]["rejected"]) == v["split_dialogue"]["rejected"], v["id"]
        pair = tasks.hh.hub_pair(**v["input"])
        assert (pair is not None) == (v["step1"] == "kept"), v["id"]  # a `crash` is dropped alone
        if pair:
            assert pair == {"prefix": v["dev_test"]["prefix"], "suffix": v["dev_test"]["suffix"]}, v["id"]
            assert tasks.hh.cleaned(pair) == v["train"]["cleaning_kept"], v["id"]
            t, chat = v["train"], tasks.hh.chat_text(pair["prefix"])
            assert tasks.hh.prompt_text(pair["prefix"]) == t["prompt"] == v["dev_test"]["prompt"], v["id"]
            assert (chat + t["reply"] + EOS, chat + t["other_reply"] + EOS) == (t["rm_text"], t["other_rm_text"])
            assert chat + v["dev_test"]["generated_reply"] + EOS == v["dev_test"]["test_rm_text"], v["id"]
    assert {v["step1"] for v in cases} == {"kept", "dropped", "crash"}

    args = hh_args(hh, tmp_path, "--hh-dataset", str(data), "--n-val", "280", "--n-test", "100")
    splits, _ = tasks.hh.load(args)
    trained = [v["train"] for v in kept if v["train"]["cleaning_kept"] and all(v["train"]["suffix"])]
    assert sorted(
        (r["prompt"], r["response"], r["rewards"]["preference"], r["rejected"]["response"],
         r["rejected"]["rewards"]["preference"]) for r in splits["train"]) == sorted(
        (t["prompt"], t["reply"], pytest.approx(t["reward_sigmoid"][0], abs=1e-7), t["other_reply"],
         pytest.approx(t["reward_sigmoid"][1], abs=1e-7)) for t in trained + [kept[0]["train"]] * 3)
    by_reply = {(t["prompt"], t["reply"], t["other_reply"]): t for t in trained}
    for r in splits["train"]:
        t = by_reply[r["prompt"], r["response"], r["rejected"]["response"]]
        assert (r["chat"] + r["response"] + EOS, r["chat"] + r["rejected"]["response"] + EOS) == (
            t["rm_text"], t["other_rm_text"])
    test = [r for r in splits["test"] if r["subset"] == "helpful-base"]
    official = [v["dev_test"] for v in kept if v["dev_test"]["suffix"][0]]  # records have a reply
    assert sorted((r["prompt"], r["response"]) for r in test) == sorted((d["prompt"], d["suffix"][0]) for d in official)
    for r in test:
        d = next(d for d in official if (d["prompt"], d["suffix"][0]) == (r["prompt"], r["response"]))
        assert r["chat"] + d["generated_reply"] + EOS == d["test_rm_text"] == d["dev_rm_text"]
    assert {r["prompt"] for r in splits["val"]} <= {r["prompt"] for r in splits["test"]}  # PRO's dev is test's
    assert len(splits["val"]) == len(official) + 3
    assert set(scored) <= {v["train"][k] for v in kept for k in ("rm_text", "other_rm_text")}
    chosen, _ = tasks.hh.load(hh_args(hh, tmp_path, "--hh-dataset", str(data), "--hh-train", "chosen"))
    hub_order = [(v["dev_test"]["prompt"], *v["dev_test"]["suffix"]) for v in kept
                 if v["train"]["cleaning_kept"] and all(v["train"]["suffix"])]
    assert sorted((r["prompt"], r["response"], r["rejected"]["response"]) for r in chosen["train"]) == sorted(
        hub_order + hub_order[:1] * 3)
    assert any(v["train"]["suffix"] != v["dev_test"]["suffix"] for v in kept)  # the re-rank changed some pairs


def pro_folder(root, cases, clean: bool):
    """PRO's processed layout with `cases` in every file; hh_train_len2/train.json only, or with cleaner_train.json
    (the rows data_cleaning.py keeps)."""
    for folder in ("hh_train_len2", "hh_dev", "hh_test"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(v["record"], ensure_ascii=False) + "\n" for v in cases)
    (root / "hh_train_len2" / "train.json").write_text(lines)
    if clean:
        (root / "hh_train_len2" / "cleaner_train.json").write_text(
            "".join(json.dumps(v["record"]) + "\n" for v in cases if v["cleaning_kept"]))
    (root / "hh_dev" / "sampled_dev.json").write_text(lines)
    for name in tasks.hh.PRO_TEST_FILES.values():
        (root / "hh_test" / f"{name}.json").write_text(lines)
    return root


@pytest.mark.parametrize("clean", [True, False], ids=["cleaner_train", "train_only"])
def test_pro_layout_read_as_the_official_trainer(hh, tmp_path, monkeypatch, clean):
    """15 records of PRO's processed files, side by side with the official trainer, validation and test code: the
    training prompt, reply (suffix[0]), the other reply and their stored rewards after sigmoid, the cleaning, and
    every reward-model text. Departure (README): a record whose reply is empty is dropped."""
    cases = vectors("processed_records")
    data = pro_folder(tmp_path / "pro", cases, clean)
    scored = rm_lookup([[(v["test_rm_text"], 0.25), (v["rm_text"], 0.5)] for v in cases], monkeypatch)
    splits, reward_fn = tasks.hh.load(hh_args(hh, tmp_path, "--hh-dataset", str(data), "--n-val", "280", "--n-test",
                                              "100"))
    kept = [v for v in cases if v["cleaning_kept"] and v["reply"]]
    assert len(kept) == 12 and [(r["prompt"], r["response"], r["rejected"]["response"]) for r in splits["train"]] == [
        (v["prompt"], v["reply"], v["other_reply"]) for v in kept]
    for r, v in zip(splits["train"], kept):
        assert [r["rewards"]["preference"], r["rejected"]["rewards"]["preference"]] == pytest.approx(
            v["reward_sigmoid"], abs=1e-7)
        assert r["chat"] + r["response"] + EOS == v["rm_text"]
        assert r["chat"] + r["rejected"]["response"] + EOS == v["other_rm_text"]
    with_reply = [v for v in cases if v["record"]["suffix"][0]]
    assert [r["prompt"] for r in splits["val"]] == [v["dev_prompt"] for v in with_reply]
    assert [r["chat"] + v["generated_reply"] + EOS for r, v in zip(splits["val"], with_reply)] == [
        v["dev_rm_text"] for v in with_reply]
    assert [(r["prompt"], r["subset"]) for r in splits["test"]] == [
        (v["test_prompt"], s) for s in tasks.hh.HH_SUBSETS for v in with_reply]
    scored.clear()  # the training reward function reads each prompt's parsed turns, never the template
    reward_fn([r["prompt"] for r in splits["val"]], [v["generated_reply"] for v in with_reply])
    assert scored == [v["dev_rm_text"] for v in with_reply]
    with pytest.raises(cli.AlolError, match="--hh-train chosen: PRO's processed files are re-ranked"):
        tasks.hh.load(hh_args(hh, tmp_path, "--hh-dataset", str(data), "--hh-train", "chosen"))


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_neox_reward_loader_against_a_hand_computed_forward(hh, tmp_path, pooling):
    """The checkpoint layout of OpenAssistant's models (gpt_neox.* body, out_proj head, model_type
    gpt_neox_reward_model) loads through classifier_scores; each score is sigmoid(w . h + b) of the body's hidden
    state at the last token (or the mean over tokens) of that text alone, however the batch is padded."""
    folder = tmp_path / "rm"
    config = json.loads((hh["tmp"] / "reward" / "config.json").read_text()) | {"pooling": pooling}
    reward_models.NeoXRewardModel(reward_models.NeoXRewardConfig(**config)).save_pretrained(folder)
    hh["tok"].save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "gpt_neox_reward_model"
    weights = load_file(folder / "model.safetensors")
    body = transformers.GPTNeoXModel.from_pretrained(folder)  # the same weights, without our class
    texts = ["<|prompter|>how do I help?<|endoftext|><|assistant|>Kindly<|endoftext|>", "no", "No way 4. " * 5]
    expected = []
    for text in texts:
        hidden = body(**hh["tok"](text, return_tensors="pt")).last_hidden_state[0]  # (T, H), no padding
        pooled = hidden[-1] if pooling == "last" else hidden.mean(0)
        expected.append(torch.sigmoid(weights["out_proj.weight"][0] @ pooled + weights["out_proj.bias"][0]))
    args = alol.parse_args(["--device", "cpu", "--eval-batch-size", "3"])
    got = reward_models.classifier_scores(str(folder), texts, args)
    assert torch.allclose(got, torch.stack(expected).detach(), atol=1e-5)
    assert len(set(got.tolist())) == 3  # distinct texts, distinct scores: the head reads each text's own token


def test_any_one_logit_classifier_reads_conversation_and_reply(hh, tmp_path):
    """A classifier other than OpenAssistant's Pythia models (here DeBERTa-v2, as OpenAssistant's DeBERTa reward
    model) scores tokenizer(conversation, reply); one with two classes is refused."""
    tok = hh["tok"]
    config = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=1024, pad_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = transformers.DebertaV2ForSequenceClassification(transformers.DebertaV2Config(**config, num_labels=1)).eval()
    model.save_pretrained(tmp_path / "deberta")
    tok.save_pretrained(tmp_path / "deberta")
    prompts = [tasks.hh.prompt_text([f"<|prompter|>help {i}?", "<|assistant|>"]) for i in range(2)]
    reward_fn = tasks.hh.reward(alol.parse_args(["--device", "cpu", "--hh-reward-model", str(tmp_path / "deberta")]))
    got = reward_fn(prompts, ["Kindly.", "No way 1."])
    questions = [p.removeprefix(SYSTEM) for p in prompts]
    with torch.no_grad():
        logits = torch.cat([model(**tok(q, a, return_tensors="pt")).logits[:, 0]
                            for q, a in zip(questions, ["Kindly.", "No way 1."])])
    assert list(got) == ["preference"] and torch.allclose(got["preference"], torch.sigmoid(logits), atol=1e-5)
    transformers.DebertaV2ForSequenceClassification(transformers.DebertaV2Config(**config)).save_pretrained(
        tmp_path / "deberta")  # two classes
    with pytest.raises(cli.AlolError, match="deberta: expected a reward model with one logit, got 2 classes"):
        reward_fn(prompts, ["a", "b"])


def test_no_hub_and_no_cache_names_the_dataset_within_seconds_and_bad_data_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    start = time.time()
    args = alol.parse_args(["--task", "hh", "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "run")])
    with pytest.raises(cli.AlolError, match=r"'Anthropic/hh-rlhf' is not a local folder, not in the Hugging Face "
                                             r"cache.*HF_HUB_OFFLINE is set.*Download it"):
        alol.main(args)
    assert time.time() - start < 10 and not (tmp_path / "run").exists()
    with pytest.raises(SystemExit):  # argparse: "invalid choice: 'rejected' (choose from preferred, chosen, both)"
        alol.parse_args(["--task", "hh", "--hh-train", "rejected"])
    (tmp_path / "partial" / "harmless-base").mkdir(parents=True)  # one subset of four downloaded
    with gzip.open(tmp_path / "partial" / "harmless-base" / "train.jsonl.gz", "wt") as f:
        f.write(json.dumps(conversations("harmless-base", "train", 1)[0]) + "\n")
    with pytest.raises(cli.AlolError, match=r"--hh-dataset .*partial: cannot load the train and test splits of "
                                             r"harmless-base \(KeyError: 'test'\)"):
        alol.main(alol.parse_args(["--task", "hh", "--hh-dataset", str(tmp_path / "partial"), "--cache-dir",
                                   str(tmp_path / "cache"), "--out-dir", str(tmp_path / "run")]))
    assert not (tmp_path / "run").exists()


def test_hh_end_to_end_from_the_hub_layout(hh, tmp_path, monkeypatch):
    """The whole --task hh path from a tiny folder of the hub's layout, with the preset's decoding and selection:
    per-subset figures in results.json and results.md, the step-0 weights validated, the test set scored by
    --hh-test-reward-model (named in results.json), then the scored cache read back for --hh-train both."""
    # wbc, not a_lol: the tiny random reward model scores the reference's replies above every offline one
    results = alol.main(hh_args(hh, tmp_path, "--algo", "nll,wbc", "--eval-every", "0.5"))
    run = tmp_path / "run"
    assert {"results.json", "results.md", "results.png"} <= set(os.listdir(run))
    assert results["n_test"] == 8 and set(results["data"]["components"]) == {"preference"}
    assert json.load(open(run / "results.json"))["scored_by"] == {
        "train, validation, V(x)": str(hh["tmp"] / "reward"), "test: data, reference, methods": str(hh["tmp"] / "test")}
    for entry in (results["data"], results["reference"], results["methods"]["nll"], results["methods"]["wbc"]):
        assert list(entry["subsets"]) == list(tasks.hh.HH_SUBSETS)
        for subset in entry["subsets"].values():
            assert 0 <= subset["reward"] <= 1 and {"distinct_1", "distinct_2", "distinct_3", "length"} <= set(subset)
    # per subset: the mean reward of the greedy generations of that subset's prompts
    rows = [json.loads(line) for line in open(run / "reference" / "generations.jsonl")]
    for i, subset in enumerate(tasks.hh.HH_SUBSETS):
        mean = sum(r["reward_greedy"] for r in rows[2 * i:2 * i + 2]) / 2
        assert math.isclose(results["reference"]["subsets"][subset]["reward"], mean, rel_tol=1e-5)
    table = (run / "results.md").read_text()
    assert "| wbc | helpful-rejection-sampled |" in table and "| data | harmless-base |" in table
    for stage in ("reference", "nll", "wbc"):  # the initial weights are the first candidate
        assert [r["step"] for r in map(json.loads, open(run / stage / "log.jsonl")) if "val_reward" in r][0] == 0
    assert results["value"]["prompts"] == 5

    caches_made = sorted(c for c in os.listdir(tmp_path / "cache") if c.startswith("hh-"))
    files = sorted(sorted(os.listdir(tmp_path / "cache" / c)) for c in caches_made)
    assert files == [["checksums.json"] + [f"test-{s}.jsonl" for s in tasks.hh.HH_SUBSETS],
                     ["checksums.json", "train_chosen.jsonl", "train_rejected.jsonl", "val.jsonl"]]
    splits, _ = tasks.hh.load(hh_args(hh, tmp_path))
    # 4 subsets x 7 conversations: the unanswered one has no "Assistant" (PRO drops it), one has an empty reply
    assert len(splits["train"]) == 20 and all(set(r["rewards"]) == {"preference"} for r in splits["train"])
    assert all(r["rewards"]["preference"] >= r["rejected"]["rewards"]["preference"] for r in splits["train"])

    def must_not_run(*a, **kw):
        raise AssertionError("the cached data should have been read")

    monkeypatch.setattr(tasks.hh, "hub_splits", must_not_run)
    monkeypatch.setattr(caches, "add_rewards", must_not_run)
    again, _ = tasks.hh.load(hh_args(hh, tmp_path))
    assert again == splits and [r["subset"] for r in again["test"]] == [s for s in tasks.hh.HH_SUBSETS for _ in "ab"]
    both, _ = tasks.hh.load(hh_args(hh, tmp_path, "--hh-train", "both"))
    assert both["train"][:20] == splits["train"] and [r["response"] for r in both["train"][20:]] == [
        r["rejected"]["response"] for r in splits["train"]]


def test_hh_end_to_end_from_the_pro_layout(hh, tmp_path):
    """The whole --task hh path from a tiny folder of PRO's processed layout (the paper's data), with the preset's
    decoding, V(x) target (one greedy reply per prompt) and selection: trained on the stored rewards, validated and
    tested on hh_dev/ and hh_test/."""
    data = pro_folder(tmp_path / "pro", vectors("processed_records"), clean=True)
    results = alol.main(hh_args(hh, tmp_path, "--hh-dataset", str(data), "--algo", "a_lol", "--eval-every", "1"))
    assert results["n_test"] == 4 * 2 and list(results["methods"]["a_lol"]["subsets"]) == list(tasks.hh.HH_SUBSETS)
    assert results["methods"]["a_lol"]["selected"]["step"] >= 0  # a step that beat the initial weights, or them
    assert results["scored_by"]["test: data, reference, methods"] == str(hh["tmp"] / "test")
