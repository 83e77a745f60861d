"""The COMET task against the official code's outputs (tests/vectors/comet_*.json: the official preprocessing and
critic, run on small files in the real layouts), and end to end with tiny models. tests/data/comet_critic_tiny is the
seeded random critic the vectors were scored with, in the official converted layout (RobertaModel(hidden 32, 2 layers)
folder + custom_roberta_classification_head.pt of RobertaClassificationHead(32, 16, 1))."""
import json
import os
import shutil
import types

import pytest
import torch
import transformers

import alol
import caches
import cli
import checks
import models
import reward_models
import tasks.comet

HERE = os.path.dirname(os.path.abspath(__file__))
CRITIC = os.path.join(HERE, "data", "comet_critic_tiny")
VECTORS = {name: json.load(open(os.path.join(HERE, "vectors", f"comet_{name}.json")))
           for name in ("preprocess", "critic_scores")}
# Scores are fp32 sigmoids of sums of at most 64 products per layer (hidden 32, ffn 64): another reduction order moves
# a sum by <= 64 * 2^-24 ~ 4e-6 of its magnitude (~1 here) per layer, and the sigmoid's slope is <= 1/4. 1e-5 covers
# two layers, the pooler and the head; a wrong weight or token moves this random critic's scores by ~1e-2 or more.
SCORE_TOL = 1e-5


def critic_args(batch):
    return types.SimpleNamespace(device="cpu", eval_batch_size=batch)


def ftfy_fix_text():
    """ftfy.fix_text where ftfy is installed (it is optional), else None."""
    try:
        from ftfy import fix_text
    except ImportError:
        return None
    return fix_text


def test_comet_preset_is_the_papers():
    args = alol.parse_args(["--task", "comet"])
    assert (args.ref_model, args.max_response_len, args.epochs, args.batch_size, args.grad_accum) == \
        ("data/comet/comet-distill", 30, 1, 16, 1)
    assert (args.eval_every, args.eval_batch_size, args.lr, args.n_val, args.n_train) == (1 / 16, 32, 2e-5, 10_000, 0)
    assert (args.eval_num_beams, args.eval_repetition_penalty, args.eval_max_new_tokens) == (2, 2.5, 30)


def test_critic_loads_the_official_layout_with_every_key():
    roberta, info = transformers.RobertaModel.from_pretrained(CRITIC, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    critic = reward_models.load_comet_critic(CRITIC)
    head = torch.load(os.path.join(CRITIC, reward_models.CometCritic.HEAD_FILE), weights_only=True)
    assert (critic.dense.in_features, critic.dense.out_features, critic.out_proj.out_features) == (32, 16, 1)
    assert all(torch.equal(critic.state_dict()[k], v) for k, v in head.items())
    assert all(torch.equal(critic.roberta.state_dict()[k], v) for k, v in roberta.state_dict().items())


def test_critic_refuses_a_folder_without_pooler_or_head(tmp_path):
    no_pooler = transformers.RobertaModel(transformers.RobertaConfig.from_pretrained(CRITIC), add_pooling_layer=False)
    no_pooler.save_pretrained(tmp_path / "no_pooler")
    shutil.copy(os.path.join(CRITIC, reward_models.CometCritic.HEAD_FILE), tmp_path / "no_pooler")
    with pytest.raises(cli.AlolError, match="missing_keys.*pooler"):
        reward_models.load_comet_critic(str(tmp_path / "no_pooler"))
    os.remove(tmp_path / "no_pooler" / reward_models.CometCritic.HEAD_FILE)
    with pytest.raises(cli.AlolError, match="no custom_roberta_classification_head.pt"):
        reward_models.load_comet_critic(str(tmp_path / "no_pooler"))


def test_critic_inputs_and_scores_equal_the_official():
    """The official pipeline (prompt -> head and relation -> names -> ftfy -> pair -> tokens -> pooler -> head) on 20
    rows in its batches of 8; the names the official code drew are given, since ours are drawn differently."""
    rows, fix = VECTORS["critic_scores"]["rows"], ftfy_fix_text()
    tok = models.load_tokenizer(CRITIC)
    for row in rows:
        head, relation = tasks.comet.head_and_relation(row["prompt"])
        assert {"head": head, "relation": relation, "tail": row["response"]} == \
            {k: row["critic_dict"][k] for k in ("head", "relation", "tail")}
        pair = tasks.comet.critic_pair(head, relation, row["response"], fix or str, row["names_drawn"])
        if fix or not row["ftfy_changes_text"]:
            assert pair == row["critic_pair_after_names_and_ftfy"]
        else:  # without ftfy the text keeps its mojibake ("cafÃ©"), and only there differs
            assert pair != row["critic_pair_after_names_and_ftfy"]
        assert tok(*row["critic_pair_after_names_and_ftfy"])["input_ids"] == row["input_ids"]
    scores = reward_models.comet_critic_scores(CRITIC, [r["critic_pair_after_names_and_ftfy"] for r in rows],
                                               critic_args(8))
    official = torch.tensor([float(r["score_repr"]) for r in rows])
    delta = (scores - official).abs().max().item()
    print(f"COMET critic: max |score - official| over {len(rows)} rows = {delta:.3g}")
    assert delta <= SCORE_TOL
    unpadded = torch.tensor([float(r["score_unpadded_repr"]) for r in rows])  # each row scored alone
    assert (reward_models.comet_critic_scores(CRITIC, [r["critic_pair_after_names_and_ftfy"] for r in rows],
                                              critic_args(1)) - unpadded).abs().max() <= SCORE_TOL


def test_names_are_two_people_drawn_by_the_text():
    a = tasks.comet.critic_pair("PersonX asks PersonY for help", "xNeed", "to find PersonY")
    x, y = a[0].split(" asks ")[0], a[0].split(" asks ")[1].split(" for")[0]
    assert x != y and {x, y} <= set(tasks.comet.FIRST_NAMES) and a[1] == f"but before, {x} needed to find {y}"
    assert tasks.comet.critic_pair("PersonX asks PersonY for help", "xNeed", "to find PersonY") == a  # reproducible
    with pytest.raises(cli.AlolError, match="relation 'isAfter'"):
        tasks.comet.critic_pair("PersonX wakes up", "isAfter", "PersonX sleeps")


def write_official_inputs(folder):
    vec = VECTORS["preprocess"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, tasks.comet.ATOMIC10X), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in vec["input_atomic10x_jsonl"])
    with open(os.path.join(folder, tasks.comet.ATOMIC2020_TEST), "w") as f:
        f.writelines(line + "\n" for line in vec["input_atomic2020_test_tsv_lines"])


def as_official(records):
    return [(r["prompt"], r["response"], r["rewards"]["p_valid_model"]) for r in records]


def official(name, **drop):
    rows = VECTORS["preprocess"]["outputs"][name]
    return [(r["prompt_or_input_text"], r["references"], r["reward_components"]["p_valid_model"]) for r in rows
            if r["references"].strip() or not drop]


def test_preprocessing_equals_the_official(tmp_path):
    """Prompts, replies, stored rewards, kept and dropped rows: ATOMIC-10X train and val as the official files (the
    official val is then sampled by the trainer); ATOMIC 2020 test: the seven relations, the best-scored tail of each
    head and relation, with the critic scores of the official pairs."""
    write_official_inputs(tmp_path)
    args = types.SimpleNamespace(data_dir=str(tmp_path), n_train=0, n_val=10_000, n_test=10**6)
    splits = tasks.comet.atomic10x_splits(args, stored=True)
    assert as_official(splits["train"]) == official("train.jsonl")
    assert sorted(as_official(splits["val"])) == sorted(official("val.jsonl"))
    calls = VECTORS["preprocess"]["critic_inputs_for_test_tsv_in_call_order"]
    scores = reward_models.comet_critic_scores(CRITIC, [c["pair"] for c in calls], critic_args(32)).tolist()
    seen = []

    def critic(prompts, tails):  # the official scores in the official call order (duplicates drew other names)
        start = len(seen)
        seen.extend((*tasks.comet.head_and_relation(p), t) for p, t in zip(prompts, tails))
        return {"p_valid_model": torch.tensor(scores[start:len(seen)])}

    test = tasks.comet.atomic2020_test(args, critic)
    # the same rows reach the critic in the same order: the seven relations, duplicates included
    assert seen == [(c["dict"]["head"], c["dict"]["relation"], c["dict"]["tail"]) for c in calls]
    assert [(r["prompt"], r["response"]) for r in test] == [(p, t) for p, t, _ in official("test.jsonl")]
    assert all(abs(r["rewards"]["p_valid_model"] - p) <= SCORE_TOL for r, (*_, p) in zip(test, official("test.jsonl")))
    seen.clear()
    capped = tasks.comet.atomic2020_test(types.SimpleNamespace(**{**vars(args), "n_test": 2}), critic)
    assert capped == test[:2]


def tiny_policy(folder, records):
    tok = models.bpe_tokenizer(records)
    eos = tok.eos_token_id
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=1, n_head=2,
                                     bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def comet_args(tmp_path, *extra):
    return alol.parse_args(["--task", "comet", "--data-dir", str(tmp_path / "data"), "--ref-model",
                            str(tmp_path / "policy"), "--comet-critic-model", CRITIC, "--device", "cpu", "--kernel",
                            "torch", "--out-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
                            "--batch-size", "4", "--value-samples", "1", "--value-epochs", "2", "--eval-every", "0",
                            "--eval-max-new-tokens", "6", "--eval-batch-size", "8", "--report-to", "none", *extra])


def test_missing_data_says_what_to_download(tmp_path):
    args = alol.parse_args(["--task", "comet", "--data-dir", str(tmp_path / "nothing"), "--out-dir",
                            str(tmp_path / "run")])
    with pytest.raises(cli.AlolError, match=r"ATOMIC10X\.jsonl and test\.tsv: download .*symbolic-knowledge-"
                                             r"distillation\.tar\.gz.*atomic-2020.*nothing"):
        alol.main(args)
    write_official_inputs(tmp_path / "data")
    with pytest.raises(cli.AlolError, match="--comet-critic-model .*convert_keras_roberta_to_huggingface.py"):
        alol.main(comet_args(tmp_path, "--comet-critic-model", str(tmp_path / "no_critic")))
    assert not (tmp_path / "run").exists()


def test_comet_end_to_end(tmp_path, monkeypatch):
    """`python alol.py --task comet` with the reference given (the preset's comet-distill), on the official small
    files: train rewards are the stored scores, test rewards the critic's; then the cache is read back."""
    write_official_inputs(tmp_path / "data")
    splits = tasks.comet.atomic10x_splits(comet_args(tmp_path), stored=False)
    tiny_policy(tmp_path / "policy", splits["train"] + splits["val"])
    results = alol.main(comet_args(tmp_path, "--algo", "nll,a_lol"))
    assert set(results["data"]["components"]) == {"p_valid_model"} == set(results["methods"]["a_lol"]["components"])
    assert results["n_test"] == len(official("test.jsonl")) and results["reference"]["selected"] is None
    for entry in (results["reference"], results["methods"]["nll"], results["methods"]["a_lol"]):
        assert 0 <= entry["reward_sampled"] <= 1 and 0 <= entry["reward_greedy"] <= 1
    assert os.path.exists(tmp_path / "run" / "results.md") and os.path.exists(tmp_path / "run" / "curves.png")
    assert not os.path.exists(tmp_path / "run" / "reference" / "log.jsonl")  # comet-distill is not trained again
    folders = [d for d in os.listdir(tmp_path / "data") if d.startswith("alol-")]
    cached = os.path.join(tmp_path / "data", folders[0])
    train = checks.read_jsonl(os.path.join(cached, "train.jsonl"), "x")
    assert len(folders) == 1 and as_official(train) == official("train.jsonl")

    def must_not_run(*a, **kw):
        raise AssertionError("the cached data should have been read")

    monkeypatch.setattr(tasks.comet, "atomic10x_splits", must_not_run)
    monkeypatch.setattr(caches, "add_rewards", must_not_run)
    again, _ = tasks.comet.load(comet_args(tmp_path))
    assert as_official(again["train"]) == official("train.jsonl") and len(again["test"]) == results["n_test"]
