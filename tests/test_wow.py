"""The WoW / FaithDial tasks against the official code's outputs (tests/vectors/wow_*.json, faithdial_*.json: the
official extraction, preprocessing and reward calls, run on small files in the real layouts: ParlAI's Wizard of
Wikipedia JSON and FaithDial rows), and `--task wow` end to end with tiny models. tests/data/dialogpt_tok_tiny is the
small GPT-2-style tokenizer the official preprocessing measured histories with."""
import json
import os

import pytest
import torch
import transformers

import alol
import caches
import checks
import cli
import models
import tasks.faithdial
import tasks.wow

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = ("wow", "faithdial", "faithdial_wow")
EXTRACT = json.load(open(os.path.join(HERE, "vectors", "wow_extract.json")))
PREPROCESS = {task: json.load(open(os.path.join(HERE, "vectors", f"{task}_preprocess.json"))) for task in TASKS}
OFFICIAL_FILES = {"wow": {"train": "train.jsonl", "val": "val.jsonl", "test": "faithdial_test.jsonl"},
                  "faithdial": {"train": "train.jsonl", "val": "val.jsonl", "test": "test.jsonl"},
                  "faithdial_wow": {"train": "train.jsonl", "val": "val.jsonl", "test": "test.jsonl"}}


def write_inputs(folder):
    """The official inputs: the five ParlAI files in --data-dir, FaithDial's rows as {split}.jsonl in data/faithdial."""
    wow, faithdial = folder / "wow", folder / "faithdial"
    wow.mkdir(parents=True, exist_ok=True)
    faithdial.mkdir(exist_ok=True)
    for name, dialogues in EXTRACT["inputs"].items():
        (wow / f"{name}.json").write_text(json.dumps(dialogues))
    for split, rows in PREPROCESS["wow"]["faithdial_input_rows"].items():
        (faithdial / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return wow, faithdial


def test_wow_preset_is_the_papers():
    for task in TASKS:
        args = alol.parse_args(["--task", task])
        assert (args.model, args.ref_epochs, args.epochs, args.lr, args.batch_size, args.grad_accum) == \
            ("microsoft/DialoGPT-medium", 6, 3, 2e-5, 8, 2)
        assert (args.eval_every, args.eval_batch_size, args.max_response_len, args.eval_num_beams) == (0.5, 32, 128, 2)
    assert tasks.faithdial.load is tasks.wow.load  # one recipe under three names


def test_extraction_equals_the_official():
    """Wizard turns kept and dropped (no checked sentence, no_passages_used, first turn), knowledge, history."""
    for name, split in EXTRACT["splits"].items():
        assert tasks.wow.wow_turns(EXTRACT["inputs"][name]) == \
            [{k: turn[k] for k in ("response", "history", "knowledge")} for turn in split["kept_official"]]
    with pytest.raises(cli.AlolError, match="unknown speaker 'Narrator'"):
        tasks.wow.wow_turns([{"dialog": [{"speaker": "Narrator", "text": "x"}]}])


@pytest.mark.parametrize("task", TASKS)
def test_prompts_and_references_equal_the_official(task, tmp_path):
    """Prompts (knowledge, history compressed to 400 tokens), references, and which rows each split holds."""
    wow, faithdial = write_inputs(tmp_path)
    args = alol.parse_args(["--task", task, "--data-dir", str(wow), "--faithdial-dataset", str(faithdial)])
    tok = transformers.AutoTokenizer.from_pretrained(os.path.join(HERE, "data", "dialogpt_tok_tiny"))
    splits = tasks.wow.dialogue_splits(args, tok)
    for name, file in OFFICIAL_FILES[task].items():
        official = [(r["prompt_or_input_text"], r["references"]) for r in PREPROCESS[task]["outputs"][file]]
        assert [(r["prompt"], r["response"] + models.EOS) for r in splits[name]] == official, (task, name)


def test_history_compression_drops_the_earliest_turns():
    """Over 400 tokens, the earliest turns go one by one; a last turn alone over 400 tokens stays whole."""
    def tok(text):  # one token per word
        return {"input_ids": text.split()}

    turns = [" ".join([f"t{i}"] * 150) for i in range(4)]  # 150 tokens each, plus the joins
    record = tasks.wow.dialogue_record({"history": turns, "knowledge": " k ", "response": " r "}, tok)
    assert record == {"prompt": f"Knowledge: k{models.EOS}{models.EOS.join(turns[2:])}{models.EOS}", "response": "r"}
    record = tasks.wow.dialogue_record({"history": turns[:1] + ["w " * 500], "knowledge": "k", "response": "r"}, tok)
    assert record["prompt"] == f"Knowledge: k{models.EOS}{('w ' * 500).strip()}{models.EOS}"


@pytest.mark.parametrize("task", TASKS)
def test_reward_model_inputs_equal_the_official(task, monkeypatch):
    """Each official reward call's inputs: FaithCritic's (knowledge with its leading space, reply), CoLA's reply,
    DialogRPT's history<|endoftext|>reply; and the tf-idf values, fitted on WoW's raw training replies."""
    seen = []

    def recorded(path, texts, args, label=None, pairs=None, max_tokens=None):
        seen.append((path, texts, pairs, None if label is None else label(None)))
        return torch.zeros(len(texts))

    monkeypatch.setattr(tasks.wow, "classifier_scores", recorded)
    args = alol.parse_args(["--task", task, "--faithcritic-model", "/fc", "--fluency-model", "/cola",
                            "--depth-model", "/depth"])
    monkeypatch.setattr(tasks.wow, "hub_path", lambda name: name)
    references = [t["response"] for t in EXTRACT["splits"]["train"]["kept_official"]]
    reward_fn = tasks.wow.reward(args, references)
    calls = PREPROCESS[task]["reward_calls"]
    for i in range(0, len(calls), 4):
        batch = {c["component"]: c for c in calls[i:i + 4]}
        prompts, responses = batch["fluency"]["batch_text"], batch["fluency"]["batch_responses"]
        seen.clear()
        out = reward_fn(prompts, responses)
        faith, fluency, depth = seen
        assert faith == ("/fc", [m["text"] for m in batch["faithdial"]["model_inputs"]],
                         [m["text_pair"] for m in batch["faithdial"]["model_inputs"]], 0)  # softmax index 0
        assert fluency == ("/cola", [m["text"] for m in batch["fluency"]["model_inputs"]], None, 1)  # LABEL_1
        assert depth[:3] == ("/depth", [m["text"] for m in batch["depth"]["model_inputs"]], None)
        assert torch.allclose(out["diversity"].double(), torch.tensor(batch["tfidf"]["outputs"], dtype=torch.double),
                              atol=1e-6)  # float32 in alol's reward tensors: 2^-24 of values <= 1


def tiny_models(folder, texts):
    tok = models.bpe_tokenizer([{"prompt": t, "response": ""} for t in texts])
    eos = tok.eos_token_id
    gpt2 = dict(vocab_size=len(tok), n_positions=1024, n_embd=32, n_layer=1, n_head=2, bos_token_id=eos,
                eos_token_id=eos, pad_token_id=eos)
    roberta = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=64, max_position_embeddings=600, pad_token_id=eos, bos_token_id=eos,
                   eos_token_id=eos, num_labels=2)
    torch.manual_seed(0)
    saved = {"policy": transformers.GPT2LMHeadModel(transformers.GPT2Config(**gpt2)),
             "depth": transformers.GPT2ForSequenceClassification(transformers.GPT2Config(**gpt2, num_labels=1)),
             "cola": transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**roberta)),
             "faithcritic": transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**roberta))}
    for name, model in saved.items():
        model.save_pretrained(folder / name)
        tok.save_pretrained(folder / name)
    return ["--model", str(folder / "policy"), "--depth-model", str(folder / "depth"), "--fluency-model",
            str(folder / "cola"), "--faithcritic-model", str(folder / "faithcritic")]


def wow_args(tmp_path, flags, *extra):
    return alol.parse_args(["--task", "wow", "--data-dir", str(tmp_path / "wow"), "--faithdial-dataset",
                            str(tmp_path / "faithdial"), *flags, "--device", "cpu", "--kernel", "torch", "--out-dir",
                            str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--ref-epochs", "1",
                            "--epochs", "1", "--batch-size", "4", "--grad-accum", "1", "--value-samples", "1",
                            "--value-epochs", "2", "--eval-every", "0", "--eval-max-new-tokens", "6",
                            "--eval-batch-size", "8", "--max-response-len", "16", "--report-to", "none", *extra])


def test_missing_data_says_what_to_download(tmp_path):
    args = alol.parse_args(["--task", "wow", "--data-dir", str(tmp_path / "nothing"), "--out-dir",
                            str(tmp_path / "run")])
    with pytest.raises(cli.AlolError, match=r"train\.json and valid_topic_split\.json: download http://parl\.ai/"
                                             r"downloads/wizard_of_wikipedia/wizard_of_wikipedia\.tgz.*nothing"):
        alol.main(args)
    wow, _ = write_inputs(tmp_path)
    with pytest.raises(cli.AlolError, match="--faithdial-dataset .*no_faithdial.*train.jsonl, validation.jsonl"):
        tasks.wow.faithdial_rows(alol.parse_args(["--task", "wow", "--faithdial-dataset",
                                                  str(tmp_path / "no_faithdial")]))
    with pytest.raises(cli.AlolError, match="no-such-data.*not in the Hugging Face cache.*HF_HUB_OFFLINE is set.*"
                                             "train.jsonl, validation.jsonl"):
        tasks.wow.faithdial_rows(alol.parse_args(["--task", "wow", "--faithdial-dataset", "nobody/no-such-data"]))
    assert not (tmp_path / "run").exists()


def test_wow_end_to_end(tmp_path, monkeypatch):
    """`python alol.py --task wow` on the official small files with tiny models: four rewards; then the cache."""
    wow, faithdial = write_inputs(tmp_path)
    texts = [t for d in EXTRACT["inputs"].values() for dialogue in d for u in dialogue["dialog"] for t in [u["text"]]]
    texts += [r["knowledge"] for rows in PREPROCESS["wow"]["faithdial_input_rows"].values() for r in rows]
    flags = tiny_models(tmp_path, texts)
    results = alol.main(wow_args(tmp_path, flags, "--algo", "nll,a_lol"))
    components = {"faithfulness", "fluency", "engagement", "diversity"}
    assert set(results["data"]["components"]) == components == set(results["methods"]["a_lol"]["components"])
    for entry in (results["reference"], results["methods"]["nll"], results["methods"]["a_lol"]):
        assert 0 <= entry["reward_sampled"] <= 4 and 0 <= entry["reward_greedy"] <= 4
    assert results["n_test"] == len(PREPROCESS["wow"]["outputs"]["faithdial_test.jsonl"])
    assert os.path.exists(tmp_path / "run" / "results.md") and os.path.exists(tmp_path / "run" / "curves.png")
    folders = [d for d in os.listdir(wow) if d.startswith("alol-")]
    cached = os.path.join(wow, folders[0])
    assert len(folders) == 1 and len(checks.read_jsonl(os.path.join(cached, "train.jsonl"), "x")[0]["rewards"]) == 4

    def must_not_run(*a, **kw):
        raise AssertionError("the cached data should have been read")

    monkeypatch.setattr(tasks.wow, "dialogue_splits", must_not_run)
    monkeypatch.setattr(caches, "add_rewards", must_not_run)
    again, _ = tasks.wow.load(wow_args(tmp_path, flags))
    assert [r["rewards"] for r in again["train"]] == \
        [r["rewards"] for r in checks.read_jsonl(os.path.join(cached, "train.jsonl"), "x")]
