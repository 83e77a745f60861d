"""The paper's HH task: Anthropic's Helpful and Harmless dialogues (Anthropic/hh-rlhf; one folder per subset, each
with a train and a test split of `chosen` and `rejected` transcripts that differ in the last assistant turn). The
prompt is every turn before that one, in the official template (lolrl_qlora_llama_hh.py); the reply is the response;
the reward is the sigmoid of OpenAssistant's reward model. README, "The paper's HH task"."""
import os
import random
import re

import transformers

import reward_models
from caches import fingerprint, scored_splits
from cli import AlolError, opt
from models import EOS, from_pretrained, hub_path

# The paper's HH settings (lolrl_qlora_llama_hh.py): prompts 640 tokens, responses 128, batch 4 x 4, grad-norm 0.3,
# no weight decay, value head 10 epochs at lr 1e-5, greedy test decode of 128 tokens, kl_beta 0.2 (its README).
# The policy is Qwen2.5-0.5B trained in full (LLaMA-7B with QLoRA in the paper): README, "--task hh".
PRESET = dict(model="Qwen/Qwen2.5-0.5B", n_train=0, n_val=1000, n_test=500, max_prompt_len=640, max_response_len=128,
              ref_epochs=1, ref_lr=1e-5, epochs=1, lr=1e-5, batch_size=4, grad_accum=4, weight_decay=0.0,
              max_grad_norm=0.3, kl_beta=0.2, value_samples=2, value_epochs=10, value_lr=1e-5, save_every=1000,
              eval_max_new_tokens=128, eval_batch_size=32)
SETTINGS = {
    "hh_dataset": opt("Anthropic/hh-rlhf", "hh: Hugging Face dataset id, or a folder of its layout (<subset>/"
                      "train.jsonl.gz, test.jsonl.gz)"),
    "hh_train": opt("chosen", "hh: offline replies: `chosen` (the paper's) or `both`, chosen and rejected pooled",
                    ["chosen", "both"]),
    "hh_reward_model": opt("OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5", "hh: sigmoid of this reward model "
                           "(the paper's for train and validation; or any one-logit sequence classifier)")}
HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")  # the paper's test sets
HH_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the user's questions.\n")
HH_TRAIN = {"chosen": ("chosen",), "both": ("chosen", "rejected")}  # the paper's good_priority; official all_priority
HH_ROLE_TOKENS = {"Human": "<|prompter|>", "Assistant": "<|assistant|>"}  # OpenAssistant's, for its reward models
HH_REWARD_MAX_TOKENS = 1024  # the official reward input length (left-truncated)
HH_SPLIT_SEED = 901  # not --seed: every run splits the same way, so the scored cache is shared


def hh_record(transcript: str):
    """{"prompt", "response"} of a "\\n\\nHuman: ... \\n\\nAssistant: ..." transcript, or None when it does not end in a
    non-empty assistant turn. Turns are stripped; text before the first turn is dropped."""
    parts = re.split(r"(?:^|\n\n)(Human|Assistant):", transcript)[1:]  # role, text, role, text, ...
    turns = [(role, text.strip()) for role, text in zip(parts[::2], parts[1::2])]
    if not turns or turns[-1][0] != "Assistant" or not turns[-1][1]:
        return None
    prompt = "".join(f" ### {role}: {text}" for role, text in turns[:-1]) + " ### Assistant: "
    return {"prompt": HH_SYSTEM + prompt.strip(), "response": turns[-1][1]}


def hh_chat(prompt: str, response: str) -> str:
    """A prompt in the template and its reply as OpenAssistant's reward models read a chat (official metrics_hh.py):
    role token, text and EOS for every turn."""
    parts = re.split(r" ?### (Human|Assistant): ?", prompt.removeprefix(HH_SYSTEM))[1:]
    turns = list(zip(parts[::2], parts[1::2]))[:-1] + [("Assistant", response)]  # the prompt's last turn is empty
    return "".join(HH_ROLE_TOKENS[role] + text + EOS for role, text in turns)


def reward(args, references=None):
    """sigmoid(reward model) in [0, 1], as the official code. OpenAssistant's Pythia models (NeoXRewardModel) read the
    whole chat as one text; any other classifier reads (conversation, reply), as OpenAssistant's DeBERTa model does."""
    path = hub_path(args.hh_reward_model)  # an unreachable hub fails here, at once
    reward_models.register()
    chat = from_pretrained(transformers.AutoConfig, path).model_type == reward_models.NeoXRewardConfig.model_type

    def reward_fn(prompts, responses):
        if chat:
            texts, pairs = [hh_chat(p, r) for p, r in zip(prompts, responses)], None
        else:
            texts, pairs = [p.removeprefix(HH_SYSTEM) for p in prompts], responses
        return {"preference": reward_models.classifier_scores(path, texts, args, None, pairs, HH_REWARD_MAX_TOKENS)}

    return reward_fn


def hh_splits(args) -> dict:
    """The train conversations of the four subsets pooled and shuffled: val = the first n_val, train = the rest (at
    most n_train if set), both chosen and rejected; test = the first n_test chosen of each subset's shuffled test
    split. Transcripts without a final assistant reply are dropped."""
    import datasets

    datasets.disable_progress_bars()
    source, pool, parts = hub_path(args.hh_dataset, "dataset"), [], {}
    for subset in HH_SUBSETS:
        try:
            data = datasets.load_dataset(source, data_dir=subset)
            rows, test = data["train"].to_list(), [row["chosen"] for row in data["test"]]
        except Exception as e:  # a partial download or a folder of another layout
            raise AlolError(f"--hh-dataset {args.hh_dataset}: cannot load the train and test splits of {subset} "
                            f"({type(e).__name__}: {e})") from None
        pool += rows
        test = random.Random(HH_SPLIT_SEED).sample(test, len(test))
        parts[f"test-{subset}"] = list(filter(None, map(hh_record, test)))[:args.n_test]
    random.Random(HH_SPLIT_SEED).shuffle(pool)
    val, train = pool[:args.n_val], pool[args.n_val:][:args.n_train or None]
    splits = {"train_chosen": list(filter(None, (hh_record(row["chosen"]) for row in train))),
              "train_rejected": list(filter(None, (hh_record(row["rejected"]) for row in train))),
              "val": list(filter(None, (hh_record(row["chosen"]) for row in val))), **parts}
    for name in (name for name, records in splits.items() if not records):  # else cached empty: every rerun fails
        where = f"{name[5:]}/test.jsonl.gz" if name.startswith("test-") else "<every subset>/train.jsonl.gz"
        raise AlolError(f"--hh-dataset {args.hh_dataset}: {where}: no {name.partition('_')[2] or 'chosen'} transcript "
                        f"ends in a non-empty Assistant turn, so the {name} split is empty")
    return splits


def load(args, reward_fn=None):
    """The HH splits with their rewards (test records labelled with their subset), and the reward function; cached in
    --cache-dir under a key of the dataset, the sizes and the reward model."""
    settings = {k: vars(args)[k] for k in ("hh_dataset", "hh_reward_model", "n_train", "n_val", "n_test", "reward_fn")}
    local = sorted(os.path.join(d, f) for d, _, names in os.walk(args.hh_dataset) for f in names)  # [] for a hub id
    files = {"local": [[os.path.relpath(p, args.hh_dataset), os.path.getsize(p), os.path.getmtime(p)] for p in local]}
    names = ("train_chosen", "train_rejected", "val", *(f"test-{subset}" for subset in HH_SUBSETS))
    parts, reward_fn = scored_splits(os.path.join(args.cache_dir, "hh-" + fingerprint(settings, files)), names,
                                     lambda: hh_splits(args), lambda parts: reward_fn or reward(args))
    return {"train": [r for kind in HH_TRAIN[args.hh_train] for r in parts[f"train_{kind}"]], "val": parts["val"],
            "test": [{**r, "subset": subset} for subset in HH_SUBSETS for r in parts[f"test-{subset}"]]}, reward_fn


def data_files(args) -> list:
    return []  # a local --hh-dataset folder is covered by the scored cache's key, not (yet) by --resume
