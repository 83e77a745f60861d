"""The paper's HH task: Anthropic's Helpful and Harmless dialogues as PRO processed them (the data the official
README names), from one of two sources (--hh-dataset):

- a folder in PRO's processed layout (hh_train_len2/, hh_dev/sampled_dev.json, hh_test/): the paper's files, read as
  the official trainer reads them (lolrl_qlora_llama_hh.py, qlora_llama_hh_eval.py);
- Anthropic/hh-rlhf (or a folder of its layout: <subset>/{train,test}.jsonl.gz), processed as PRO did
  (DAMO-ConvAI PRO/train/hh_preprocess_data/step_{1,2,3}): its splitter and filters, LoL-RL's data_cleaning.py, and
  each training pair re-ranked by the training reward model (scored once, cached).

A record's prompt is every turn before the last one, in the official template; its reply is the pair's first reply
(for training: the reward model's preferred one); its reward is the sigmoid of OpenAssistant's reward model, which
reads the turns as parsed, never re-parsed from the template. README, "The paper's HH task"."""
import json
import os
import random
import re

import torch
import transformers

import reward_models
from caches import fingerprint, scored_splits
from cli import AlolError, opt
from models import EOS, from_pretrained, hub_path
from scoring import add_rewards

# The paper's HH settings (lolrl_qlora_llama_hh.py): prompts 640 tokens, responses 128, batch 4 x 4, grad-norm 0.3,
# paged AdamW with eps 1e-6 and bitsandbytes' default weight decay 0.01 (the script never sets it), a constant
# learning rate (get_constant_schedule ignores the warmup it is given), selection by validation reward, V(x) fitted
# 10 epochs at lr 1e-5 to one greedy reply per validation prompt, decoding greedy up to 128 tokens or `###`.
# kl_beta 0.2 is the official PPO script's (ppo_qlora_llama_hh.py:124); the A-LoL script's default is 0.0
# (lolrl_qlora_llama_hh.py:112), with which a_lol_kl would be a_lol_ref_free. The policy is Qwen2.5-0.5B trained in
# full at lr 1e-5 (LLaMA-7B with QLoRA at 2e-4 in the paper): README, "--task hh".
PRESET = dict(model="Qwen/Qwen2.5-0.5B", n_train=0, n_val=280, n_test=500, max_prompt_len=640, max_response_len=128,
              ref_epochs=1, ref_lr=1e-5, epochs=1, lr=1e-5, batch_size=4, grad_accum=4, weight_decay=0.01,
              adam_eps=1e-6, lr_schedule="constant", max_grad_norm=0.3, kl_beta=0.2, value_target="greedy",
              value_epochs=10, value_lr=1e-5, save_every=1000, eval_every=0.1, eval_max_new_tokens=128,
              eval_stop="###", eval_batch_size=32)
SETTINGS = {
    "hh_dataset": opt("Anthropic/hh-rlhf", "hh: a folder in PRO's processed layout (hh_train_len2/, hh_dev/, "
                      "hh_test/: the paper's data), or Anthropic/hh-rlhf (a hub id, or a folder of its layout "
                      "<subset>/{train,test}.jsonl.gz) processed as PRO did"),
    "hh_train": opt("preferred", "hh: offline replies: `preferred` by the reward model (the paper's), Anthropic's "
                    "`chosen`, or `both` replies of every pair", ["preferred", "chosen", "both"]),
    "hh_reward_model": opt("OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5", "hh: sigmoid of this reward model "
                           "(the paper's for train and validation; or any one-logit sequence classifier)"),
    "hh_test_reward_model": opt("OpenAssistant/oasst-rm-2-pythia-6.9b-epoch-1", "hh: the reward model that scores "
                                "the test set (the paper's)")}
HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")  # the paper's test sets
PRO_TEST_FILES = dict(zip(HH_SUBSETS, ("harmless_base", "helpful_base", "helpful_online", "helpful_rejection")))
HH_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the user's questions.\n")
HH_ROLE_TOKENS = {"Human": "<|prompter|>", "Assistant": "<|assistant|>"}  # OpenAssistant's, as PRO writes them
HH_REWARD_MAX_TOKENS = 1024  # the official reward input length (left-truncated)
PRO_SEED = 42  # PRO's random.seed(42) before each shuffle (step_2, step_3)
PRO_DEV_SIZE = 280  # PRO's sampled_dev.json


# ---- PRO's processing of a hub transcript pair ----------------------------------------------------------------
def split_dialogue(transcript: str) -> list:
    """[[role token, text], ...] as PRO's splitter (step_1_process.py:29-55, from OpenAssistant): paragraphs are the
    text between blank lines; one that does not open with `Human:` or `Assistant:` is dropped (so is text after a
    blank line inside a turn); the text starts one character after the colon and is stripped; consecutive turns of
    one speaker are merged with a newline."""
    turns = []
    for paragraph in transcript.split("\n\n"):
        role = next((r for r in HH_ROLE_TOKENS if paragraph.startswith(r + ":")), None)
        if role is None:
            continue
        text = paragraph[len(role) + 2:].strip()
        if turns and turns[-1][0] == HH_ROLE_TOKENS[role]:
            turns[-1][1] += "\n" + text
        else:
            turns.append([HH_ROLE_TOKENS[role], text])
    return turns


def hub_pair(chosen: str, rejected: str):
    """PRO's step 1 on one pair: {"prefix": ["<|prompter|>text", ..., last role token], "suffix": [chosen reply,
    rejected reply]} (the prefix is the chosen transcript's), or None when PRO drops it: no "Assistant" anywhere in
    chosen, or turn counts that differ. A side that does not open with a Human turn is dropped too, where PRO's
    assert aborts the whole file (README, departures). A transcript ending in a Human turn is kept, as PRO keeps it."""
    if "Assistant" not in chosen:
        return None
    good, bad = split_dialogue(chosen), split_dialogue(rejected)
    human = HH_ROLE_TOKENS["Human"]
    if not good or not bad or good[0][0] != human or bad[0][0] != human or len(good) != len(bad):
        return None
    return {"prefix": [role + text for role, text in good[:-1]] + [good[-1][0]], "suffix": [good[-1][1], bad[-1][1]]}


def cleaned(pair: dict) -> bool:
    """LoL-RL's data_cleaning.py: a training pair is kept unless either reply ends in a colon."""
    return not any(s.endswith(":") for s in pair["suffix"])


def prompt_text(prefix: list) -> str:
    """The official template (lolrl_qlora_llama_hh.py:714-716): the system line, then the turns as ` ### Human: ` and
    ` ### Assistant: `, stripped; a role token inside a turn's text is replaced too, as there."""
    turns = "".join(prefix).replace(HH_ROLE_TOKENS["Human"], " ### Human: ")
    return HH_SYSTEM + turns.replace(HH_ROLE_TOKENS["Assistant"], " ### Assistant: ").strip()


def chat_text(prefix: list) -> str:
    """What the reward model reads before the reply (official metrics_hh.py): role token, text and EOS for every
    turn, then the last role token; the reply and an EOS follow."""
    return "".join(turn + EOS for turn in prefix[:-1]) + prefix[-1]


def postprocess(text: str) -> str:
    """A decoded reply cut as the official code cuts it (lolrl_qlora_llama_hh.py:155-156): at the next turn marker,
    and without the `###` it stopped at (every `###` is removed then)."""
    text = text.split("\n Human:")[0].split("\nHuman:")[0].split("\n### Human")[0].strip()
    return text.replace("###", "").strip() if text.endswith("###") else text


def record(prefix: list, reply: str, logit=None) -> dict:
    """One record of this project's schema, with the reward model's chat; `logit`: a reward stored in PRO's files."""
    r = {"prompt": prompt_text(prefix), "response": reply, "chat": chat_text(prefix)}
    return r if logit is None else {**r, "rewards": {"preference": torch.sigmoid(torch.tensor(logit)).item()}}


# ---- the reward ------------------------------------------------------------------------------------------------
def reward(args, references=None, records=(), model=None):
    """sigmoid(reward model) in [0, 1], as the official code; `model`: --hh-reward-model by default. OpenAssistant's
    Pythia models (NeoXRewardModel) read the chat of `records` (their parsed turns) followed by the reply; a prompt
    that is not among them (your --train-file) is split on the template's role markers. Any other classifier reads
    (conversation, reply), as OpenAssistant's DeBERTa model does."""
    path = hub_path(model or args.hh_reward_model)  # an unreachable hub fails here, at once
    reward_models.register()
    neox = from_pretrained(transformers.AutoConfig, path).model_type == reward_models.NeoXRewardConfig.model_type
    chats = {r["prompt"]: r["chat"] for r in records if "chat" in r}

    def reward_fn(prompts, responses):
        if neox:
            texts, pairs = [(chats.get(p) or template_chat(p)) + r + EOS for p, r in zip(prompts, responses)], None
        else:
            texts, pairs = [p.removeprefix(HH_SYSTEM) for p in prompts], responses
        return {"preference": reward_models.classifier_scores(path, texts, args, None, pairs, HH_REWARD_MAX_TOKENS)}

    reward_fn.model = model or args.hh_reward_model  # results.json names it
    return reward_fn


def template_chat(prompt: str) -> str:
    """The chat of a prompt that is only known as text (your --train-file): split on the template's role markers."""
    parts = re.split(r" ?### (Human|Assistant): ?", prompt.removeprefix(HH_SYSTEM))[1:]  # role, text, role, text...
    turns = [HH_ROLE_TOKENS[role] + text for role, text in zip(parts[::2], parts[1::2])]  # the last one: a role token
    return chat_text(turns) if turns else ""


def test_reward(args, records: list, reward_fn):
    """The test set's reward: --hh-test-reward-model (the paper's 6.9 B); with --reward-fn or your own files (whose
    test rewards are yours), the training reward."""
    own = args.reward_fn or args.train_file
    return reward_fn if own else reward(args, records=records, model=args.hh_test_reward_model)


# ---- the two sources -------------------------------------------------------------------------------------------
def read_lines(path: str) -> list:
    """PRO's files: one JSON object per line."""
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise AlolError(f"--hh-dataset: cannot read {path} ({type(e).__name__}: {e})") from None


def pro_splits(folder: str, args) -> dict:
    """PRO's processed layout as the official trainer reads it: training pairs from hh_train_len2/cleaner_train.json
    (else train.json, cleaned as data_cleaning.py cleans it), already re-ranked (suffix[0] preferred) and scored
    (their stored logits are the rewards, as in the trainer); hh_dev/sampled_dev.json; hh_test/<subset>.json."""
    train_dir = os.path.join(folder, "hh_train_len2")
    clean = os.path.exists(os.path.join(train_dir, "cleaner_train.json"))
    rows = read_lines(os.path.join(train_dir, "cleaner_train.json" if clean else "train.json"))
    rows = [row for row in rows if clean or cleaned(row)]
    pairs = [(record(row["prefix"][0], row["suffix"][0], row["reward"][0]),
              record(row["prefix"][0], row["suffix"][1], row["reward"][1])) for row in rows]
    split = {"train": pairs, "val": [record(row["prefix"][0], row["suffix"][0], row["reward"][0]) for row in
                                     read_lines(os.path.join(folder, "hh_dev", "sampled_dev.json"))]}
    for subset, name in PRO_TEST_FILES.items():
        split[f"test-{subset}"] = [record(row["prefix"][0], row["suffix"][0]) for row in
                                   read_lines(os.path.join(folder, "hh_test", f"{name}.json"))]
    return split


def hub_rows(args, subset: str, split: str) -> list:
    """One subset's split of Anthropic/hh-rlhf (a hub id or a folder of its layout)."""
    import datasets

    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(hub_path(args.hh_dataset, "dataset"), data_dir=subset)[split].to_list()
    except Exception as e:  # a partial download or a folder of another layout
        raise AlolError(f"--hh-dataset {args.hh_dataset}: cannot load the train and test splits of {subset} "
                        f"({type(e).__name__}: {e})") from None


def hub_splits(args, parts: tuple) -> dict:
    """The hub's pairs processed as PRO did: `train` (every subset's train split, cleaned, shuffled), `val` (PRO's
    sampled_dev: each subset's test split shuffled with seed 42, pooled in step_2's order, shuffled, the first 280)
    and the test sets (each subset's test split shuffled with seed 42; in the hub's order: the first reply is the
    chosen one, as in the paper's files). Training pairs are records of the chosen and of the rejected reply, in
    step; they are re-ranked once scored (load). A pair whose kept reply is empty is dropped (this project's records
    have a reply)."""
    out, dev, rng, training = {}, [], None, "train_chosen" in parts
    for subset in HH_SUBSETS:
        if training:
            pairs = [p for p in (hub_pair(row["chosen"], row["rejected"]) for row in hub_rows(args, subset, "train"))
                     if p and cleaned(p) and all(p["suffix"])]
            out.setdefault("train", []).extend(pairs)
        test = [p for p in (hub_pair(row["chosen"], row["rejected"]) for row in hub_rows(args, subset, "test")) if p]
        rng = random.Random(PRO_SEED)
        rng.shuffle(test)
        dev += test
        out[f"test-{subset}"] = [record(p["prefix"], p["suffix"][0]) for p in test if p["suffix"][0]][:args.n_test]
    rng.shuffle(dev)  # step_2 shuffles the pool with the state its last subset's shuffle left
    out["val"] = [record(p["prefix"], p["suffix"][0]) for p in dev[:PRO_DEV_SIZE] if p["suffix"][0]][:args.n_val]
    if training:
        random.Random(PRO_SEED).shuffle(out["train"])
        train = out.pop("train")[:args.n_train or None]
        out["train_chosen"] = [record(p["prefix"], p["suffix"][0]) for p in train]
        out["train_rejected"] = [record(p["prefix"], p["suffix"][1]) for p in train]
    splits = {name: out[name] for name in parts}
    for name in (name for name, records in splits.items() if not records):  # else cached empty: every rerun fails
        where = name[5:] if name.startswith("test-") else "<every subset>"  # val: PRO's dev comes from the test splits
        where += "/train.jsonl.gz" if name.startswith("train") else "/test.jsonl.gz"
        raise AlolError(f"--hh-dataset {args.hh_dataset}: {where}: no pair is left after PRO's parsing and filters "
                        f"(both replies end an Assistant turn, equal turn counts), so the {name} split is empty")
    return splits


def load(args, reward_fn=None):
    """The HH splits with their rewards, the test records labelled with their subset and scored by the test reward
    model, and the training reward function. Records scored here are cached in --cache-dir under a key of the
    dataset, the sizes and the reward model."""
    pro = os.path.isdir(os.path.join(args.hh_dataset, "hh_test"))
    if pro and args.hh_train == "chosen":
        raise AlolError("--hh-train chosen: PRO's processed files are re-ranked and do not say which reply was "
                        "Anthropic's chosen one; use preferred or both, or the hub's Anthropic/hh-rlhf")
    local = sorted(os.path.join(d, f) for d, _, names in os.walk(args.hh_dataset) for f in names)  # [] for a hub id
    files = {"local": [[os.path.relpath(p, args.hh_dataset), os.path.getsize(p), os.path.getmtime(p)] for p in local]}
    tests = tuple(f"test-{subset}" for subset in HH_SUBSETS)
    settings = {k: vars(args)[k] for k in ("hh_dataset", "n_train", "n_val", "n_test", "reward_fn")}

    def scored(names, model, build):
        cache = os.path.join(args.cache_dir, "hh-" + fingerprint({**settings, "model": model, "parts": names}, files))
        return scored_splits(cache, names, build, lambda parts: reward_fn or reward(
            args, records=[r for part in parts.values() for r in part], model=model))

    if pro:
        parts = pro_splits(args.hh_dataset, args)
        pairs, val = parts["train"][:args.n_train or None], parts["val"][:args.n_val]
        if reward_fn:  # --reward-fn replaces the stored rewards too (add_rewards scores records without rewards)
            records = [r for pair in pairs for r in pair] + val
            add_rewards({"all": [r for r in records if r.pop("rewards", True)]}, reward_fn)
        test, _ = scored(tests, args.hh_test_reward_model, lambda: {
            name: [r for r in parts[name] if r["response"]][:args.n_test] for name in tests})
    else:
        parts, _ = scored(("train_chosen", "train_rejected", "val"), args.hh_reward_model,
                          lambda: hub_splits(args, ("train_chosen", "train_rejected", "val")))
        pairs, val = list(zip(parts["train_chosen"], parts["train_rejected"])), parts["val"]
        test, _ = scored(tests, args.hh_test_reward_model, lambda: hub_splits(args, tests))
        if args.hh_train != "chosen":  # PRO's step 2 re-rank: the first reply is the reward model's preferred
            pairs = [(b, a) if b["rewards"]["preference"] > a["rewards"]["preference"] else (a, b) for a, b in pairs]
    train = [{**a, "rejected": {k: b[k] for k in ("response", "rewards")}} for a, b in pairs if a["response"]]
    if args.hh_train == "both":  # the other replies as records of their own (the official all_priority)
        train += [b for _, b in pairs if b["response"]]
    val = [r for r in val if r["response"]]
    # From here on the reward scores replies to validation prompts only (V's targets, selection): their chats suffice
    return {"train": train, "val": val, "test": [{**r, "subset": name.removeprefix("test-")} for name in tests
                                                 for r in test[name]]}, reward_fn or reward(args, records=val)


def data_files(args) -> list:
    return []  # a local --hh-dataset folder is covered by the scored cache's key, not (yet) by --resume
