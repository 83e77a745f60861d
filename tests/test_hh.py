"""The HH task offline: a tiny dataset in the layout of the hub's Anthropic/hh-rlhf and tiny random models of the
default classes (a Qwen2 policy, OpenAssistant's GPT-NeoX reward model), saved to a temporary folder and loaded by
path through the same code as the hub ids."""
import gzip
import json
import math
import os
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

SYSTEM = tasks.hh.HH_SYSTEM


def conversations(subset, split, n):
    """n chosen/rejected pairs: single- and multi-turn ones, one without a final reply and one whose rejected reply
    is empty (both dropped where they fail: the first from every split, the second only from the rejected)."""
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
            texts += [tasks.hh.hh_record(row["chosen"]) for row in rows if tasks.hh.hh_record(row["chosen"])]
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
    for name, model in {"policy": policy, "reward": reward}.items():
        model.save_pretrained(tmp / name)
        tok.save_pretrained(tmp / name)
    return {"tmp": tmp, "data": data, "tok": tok}


def hh_args(hh, tmp_path, *extra):
    return alol.parse_args(["--task", "hh", "--hh-dataset", str(hh["data"]), "--model", str(hh["tmp"] / "policy"),
                            "--hh-reward-model", str(hh["tmp"] / "reward"), "--device", "cpu", "--kernel", "torch",
                            "--out-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
                            "--n-val", "5", "--n-test", "2", "--ref-epochs", "1", "--epochs", "1", "--batch-size", "4",
                            "--grad-accum", "1", "--value-samples", "1", "--value-epochs", "2",
                            "--eval-max-new-tokens", "6", "--eval-batch-size", "16", *extra])


def test_hh_preset_is_the_papers_lengths_and_optimiser():
    args = alol.parse_args(["--task", "hh"])
    lengths = (args.max_prompt_len, args.max_response_len, args.eval_max_new_tokens, args.eval_num_beams)
    assert lengths == (640, 128, 128, 1)
    optimiser = (args.batch_size * args.grad_accum, args.max_grad_norm, args.weight_decay, args.value_epochs)
    assert optimiser == (16, 0.3, 0.0, 10)
    assert (args.model, args.hh_train, args.hh_reward_model) == (
        "Qwen/Qwen2.5-0.5B", "chosen", "OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5")
    assert alol.parse_args(["--task", "hh", "--lr", "3e-5"]).lr == 3e-5


@pytest.mark.parametrize("transcript,prompt,response", [
    ("\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2+2?\n\nAssistant: 4.",
     SYSTEM + "### Human: Hi there ### Assistant: Hello! How can I help? ### Human: What is 2+2? ### Assistant:", "4."),
    ("\n\nHuman:   Where  is Paris?  \n\nAssistant:\n It is in France. \n",
     SYSTEM + "### Human: Where  is Paris? ### Assistant:", "It is in France."),
    ("\n\nHuman: \n\nAssistant: ok\n\nHuman: so?\n\nAssistant: yes",
     SYSTEM + "### Human:  ### Assistant: ok ### Human: so? ### Assistant:", "yes"),
    ("\n\nHuman: one\n\nHuman: two\n\nAssistant: three", SYSTEM + "### Human: one ### Human: two ### Assistant:",
     "three"),
], ids=["multi-turn", "whitespace", "empty-turn", "two-human-turns"])
def test_transcript_to_prompt_and_response(transcript, prompt, response):
    assert tasks.hh.hh_record(transcript) == {"prompt": prompt, "response": response}


@pytest.mark.parametrize("transcript", ["\n\nHuman: a\n\nAssistant: b\n\nHuman: c", "\n\nHuman: a\n\nAssistant:",
                                        "\n\nHuman: a\n\nAssistant:  \n ", "no turns at all", ""])
def test_transcript_without_a_final_reply_is_dropped(transcript):
    assert tasks.hh.hh_record(transcript) is None


def test_reward_model_reads_the_chat_with_role_tokens_and_eos():
    prompt = tasks.hh.hh_record("\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: \n\nAssistant: x")["prompt"]
    eos = models.EOS
    assert tasks.hh.hh_chat(prompt, "Sure.") == (f"<|prompter|>Hi{eos}<|assistant|>Hello{eos}<|prompter|>{eos}"
                                             f"<|assistant|>Sure.{eos}")


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
    prompts = [tasks.hh.hh_record(f"\n\nHuman: help {i}?\n\nAssistant: x")["prompt"] for i in range(2)]
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
    with pytest.raises(SystemExit):  # argparse: "invalid choice: 'rejected' (choose from chosen, both)"
        alol.parse_args(["--task", "hh", "--hh-train", "rejected"])
    (tmp_path / "partial" / "harmless-base").mkdir(parents=True)  # one subset of four downloaded
    with gzip.open(tmp_path / "partial" / "harmless-base" / "train.jsonl.gz", "wt") as f:
        f.write(json.dumps(conversations("harmless-base", "train", 1)[0]) + "\n")
    with pytest.raises(cli.AlolError, match=r"--hh-dataset .*partial: cannot load the train and test splits of "
                                             r"harmless-base \(KeyError: 'test'\)"):
        alol.main(alol.parse_args(["--task", "hh", "--hh-dataset", str(tmp_path / "partial"), "--cache-dir",
                                   str(tmp_path / "cache"), "--out-dir", str(tmp_path / "run")]))
    assert not (tmp_path / "run").exists()


def test_hh_end_to_end(hh, tmp_path, monkeypatch):
    """The whole --task hh path by local paths with a tiny budget: per-subset figures in results.json and
    results.md, then the scored cache read back, and --hh-train both from the same cache."""
    results = alol.main(hh_args(hh, tmp_path, "--algo", "nll,a_lol"))
    run = tmp_path / "run"
    assert {"results.json", "results.md", "results.png"} <= set(os.listdir(run))
    assert results["n_test"] == 8 and set(results["data"]["components"]) == {"preference"}
    for entry in (results["data"], results["reference"], results["methods"]["nll"], results["methods"]["a_lol"]):
        assert list(entry["subsets"]) == list(tasks.hh.HH_SUBSETS)
        for subset in entry["subsets"].values():
            assert 0 <= subset["reward"] <= 1 and {"distinct_1", "distinct_2", "distinct_3", "length"} <= set(subset)
    # per subset: the mean reward of the greedy generations of that subset's prompts
    rows = [json.loads(line) for line in open(run / "reference" / "generations.jsonl")]
    for i, subset in enumerate(tasks.hh.HH_SUBSETS):
        mean = sum(r["reward_greedy"] for r in rows[2 * i:2 * i + 2]) / 2
        assert math.isclose(results["reference"]["subsets"][subset]["reward"], mean, rel_tol=1e-5)
    table = (run / "results.md").read_text()
    assert "| a_lol | helpful-rejection-sampled |" in table and "| data | harmless-base |" in table

    cached = tmp_path / "cache" / next(c for c in os.listdir(tmp_path / "cache") if c.startswith("hh-"))
    assert sorted(os.listdir(cached)) == sorted(["train_chosen.jsonl", "train_rejected.jsonl", "val.jsonl",
                                                 "checksums.json"] + [f"test-{s}.jsonl" for s in tasks.hh.HH_SUBSETS])
    chosen = checks.read_jsonl(str(cached / "train_chosen.jsonl"), "x")  # our own schema: usable as --train-file
    rejected = checks.read_jsonl(str(cached / "train_rejected.jsonl"), "x")
    val = checks.read_jsonl(str(cached / "val.jsonl"), "x")
    # 4 subsets x 7 conversations, 5 of them held out for V: the 4 unanswered ones dropped, and the empty rejected reply
    assert len(chosen) + len(val) == 24 and len(rejected) == len(chosen) - sum(" 1: how" in r["prompt"] for r in chosen)
    assert all(set(r["rewards"]) == {"preference"} and r["prompt"].startswith(SYSTEM) for r in chosen + rejected)
    assert not any(r["response"].startswith("No way") for r in chosen)

    def must_not_run(*a, **kw):
        raise AssertionError("the cached data should have been read")

    monkeypatch.setattr(tasks.hh, "hh_splits", must_not_run)
    monkeypatch.setattr(caches, "add_rewards", must_not_run)
    splits, _ = tasks.hh.load(hh_args(hh, tmp_path))
    assert [r["response"] for r in splits["train"]] == [r["response"] for r in chosen]
    assert [r["subset"] for r in splits["test"]] == [s for s in tasks.hh.HH_SUBSETS for _ in range(2)]
    both, _ = tasks.hh.load(hh_args(hh, tmp_path, "--hh-train", "both"))
    assert both["train"] == chosen + rejected and both["test"] == splits["test"]
