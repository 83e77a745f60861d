"""The paper's Reddit task: replies to Reddit comments from Kaggle's "Reddit comment scores", one file of upvoted and
one of downvoted replies; the parent comment is the prompt (official preprocess_reddit_comment_scores_...py). Five
rewards: fluency, safety, engagement, upvotes, diversity. README, "The paper's Reddit task"."""
import os
import re

import torch

from caches import fingerprint, scored_splits
from cli import AlolError, opt
from models import EOS, hub_path, load_tokenizer
from reward_models import classifier_scores

# The paper's settings (official README commands and trainer): DialoGPT-medium, NLL reference 6 epochs, methods
# 3 epochs, lr 2e-5, batch 8 x 2, val/test 1000 per file, beam 2 with repetition penalty 2.5. For one 24 GB GPU:
# bf16 autocast over fp32 weights and AdamW (~6 GB), no [B, T, V] logits (kernels/), sequences <= 300 tokens.
PRESET = dict(model="microsoft/DialoGPT-medium", n_train=0, n_val=1000, n_test=1000, max_prompt_len=512,
              max_response_len=128, ref_epochs=6, ref_lr=2e-5, epochs=3, lr=2e-5, batch_size=8, grad_accum=2,
              value_samples=2, value_epochs=5, value_lr=2e-5, save_every=1000, eval_every=0.5,
              eval_max_new_tokens=128, eval_num_beams=2, eval_repetition_penalty=2.5, eval_batch_size=32)
SETTINGS = {
    "data_dir": opt("data/reddit", "the task's data folder: reddit: Kaggle's comments_positive.csv and "
                    "comments_negative.csv; comet: ATOMIC10X.jsonl and ATOMIC 2020's test.tsv; wow, faithdial, "
                    "faithdial_wow: Wizard of Wikipedia's train.json and valid_topic_split.json"),
    "reddit_train": opt("pos", "reddit: train on the upvoted (pos) or the downvoted (neg) replies", ["pos", "neg"]),
    "fluency_model": opt("textattack/roberta-base-CoLA", "reddit, wow fluency: P(acceptable) of the response"),
    "safety_model": opt("cardiffnlp/twitter-roberta-base-offensive", "reddit safety: P(not offensive) of the reply"),
    "depth_model": opt("microsoft/DialogRPT-depth", "reddit, wow engagement: sigmoid(DialogRPT) of parent+reply"),
    "updown_model": opt("microsoft/DialogRPT-updown", "reddit upvotes: sigmoid(DialogRPT) of parent+reply")}
REWARD_MODELS = ("fluency_model", "safety_model", "depth_model", "updown_model")
REDDIT_FILES = {"pos": "comments_positive.csv", "neg": "comments_negative.csv"}
# The official url_regex (utils/utils.py): a scheme is required, so a bare www.… stays, and the trailing ")" or
# quote of "(see http://…)" is kept.
URL = re.compile(r"https?:\/\/(www\.)?[-a-zA-Z0-9@:%._\+~#=]{1,256}\.[a-zA-Z0-9()]{1,6}\b"
                 r"([-a-zA-Z0-9@:;%_\\\+.~#?&//=]*)")


def reddit_splits(args, tok) -> dict:
    """The official preprocessing, per file: drop empty rows, sample 102,000 (random_state 901), collapse whitespace,
    drop pairs over 100 words, URLs -> <URL>, drop pairs over 300 tokens of parent EOS reply EOS; then, in sampled
    order, test = the first n_test, val = the next n_val, train = the rest (at most n_train if set)."""
    import pandas as pd

    splits = {"test": [], "val": []}
    for kind, name in REDDIT_FILES.items():
        frame = pd.read_csv(os.path.join(args.data_dir, name), usecols=["parent_text", "text"], dtype=str).dropna()
        frame = frame.sample(n=min(102_000, len(frame)), random_state=901)
        pairs = [[URL.sub("<URL>", " ".join(t.split())) for t in pair] for pair in zip(frame.parent_text, frame.text)]
        pairs = [(p, r) for p, r in pairs if 0 < len(p.split()) <= 100 and 0 < len(r.split()) <= 100]
        lengths = map(len, tok([p + EOS + r + EOS for p, r in pairs], add_special_tokens=False)["input_ids"])
        records = [{"prompt": p + EOS, "response": r} for (p, r), n in zip(pairs, lengths) if n <= 300]
        splits["test"] += records[:args.n_test]
        splits["val"] += records[args.n_test:args.n_test + args.n_val]
        splits[f"train_{kind}"] = records[args.n_test + args.n_val:][:args.n_train or None]
    return splits


def tfidf_reward(references: list):
    """The paper's "diversity" reward (official utils/rl_utils.py): the response's tf-idf vector under a
    CountVectorizer and TfidfTransformer fitted on the training references; the mean of its k non-zero
    (L2-normalised) entries, times k/10 when k < 5. Past 5 terms its maximum falls with length (tutorial.md, 10)."""
    from sklearn.feature_extraction.text import CountVectorizer, TfidfTransformer

    counts = CountVectorizer().fit(references)
    tfidf = TfidfTransformer(smooth_idf=True, use_idf=True).fit(counts.transform(references))

    def diversity(responses):
        rows = tfidf.transform(counts.transform(responses))  # sparse [N, vocabulary], rows of unit norm
        k = torch.tensor(rows.getnnz(axis=1), dtype=torch.float)  # (N,) distinct known terms
        mean = torch.tensor(rows.sum(axis=1), dtype=torch.float).flatten() / k.clamp(min=1)
        return mean * torch.where(k < 5, k / 10, 1.0)  # k = 0 gives 0

    return diversity


def acceptable_label(config) -> int:
    return 1  # textattack/roberta-base-CoLA: LABEL_1 = acceptable, as the official code reads it


def not_offensive_label(config) -> int:
    """The non-offensive class, from the labels' names; generic LABEL_0/1 follow TweetEval (0 = not-offensive)."""
    names = [config.id2label[i].lower() for i in range(config.num_labels)]
    safe = [i for i, name in enumerate(names) if name.startswith(("non", "not"))]
    if len(names) != 2 or len(safe) > 1:
        raise AlolError(f"--safety-model: expected two classes, offensive and not, got {names}")
    return safe[0] if safe else 0


def reward(args, references: list):
    """The paper's five rewards in [0, 1] (official utils/rl_utils.py; README table). Safety substitutes a hub
    classifier for ToxiChat's (not on the hub), on the reply alone: its scores are not comparable with the paper's."""
    paths = {k: hub_path(getattr(args, k)) for k in REWARD_MODELS}  # an unreachable hub fails here, at once
    diversity = tfidf_reward(references)

    def reward_fn(prompts, responses):
        threads = [p + r for p, r in zip(prompts, responses)]  # parent<|endoftext|>response: DialogRPT's input
        return {"fluency": classifier_scores(paths["fluency_model"], responses, args, acceptable_label),
                "safety": classifier_scores(paths["safety_model"], responses, args, not_offensive_label),
                "engagement": classifier_scores(paths["depth_model"], threads, args),
                "upvotes": classifier_scores(paths["updown_model"], threads, args),
                "diversity": diversity(responses)}

    return reward_fn


def load(args, reward_fn=None):
    """The Reddit splits with their rewards, and the reward function, cached next to the data under a key of the CSVs,
    the tokenizer, the sizes and the reward models."""
    paths = [os.path.join(args.data_dir, name) for name in REDDIT_FILES.values()]
    if not all(map(os.path.isfile, paths)):
        raise AlolError(f"--data-dir {args.data_dir} must hold {' and '.join(REDDIT_FILES.values())}: download "
                        "both from Kaggle's \"Reddit comment scores\" (https://www.kaggle.com/code/danofer/"
                        "reddit-comments-scores-nlp/input, free account needed) and put them in "
                        f"{os.path.abspath(args.data_dir)}")
    settings = {k: getattr(args, k) for k in ("model", "n_train", "n_val", "n_test", "reward_fn", *REWARD_MODELS)}
    csv_stamps = {"csv": [[os.path.getsize(p), os.path.getmtime(p)] for p in paths]}
    cache = os.path.join(args.data_dir, "alol-" + fingerprint(settings, csv_stamps))
    parts, reward_fn = scored_splits(
        cache, ("train_pos", "train_neg", "val", "test"), lambda: reddit_splits(args, load_tokenizer(args.model)),
        lambda parts: reward_fn or reward(args, [r["response"] for name in ("train_pos", "train_neg")
                                                 for r in parts[name]]))
    return {"train": parts[f"train_{args.reddit_train}"], "val": parts["val"], "test": parts["test"]}, reward_fn


def data_files(args) -> list:
    return [os.path.join(args.data_dir, name) for name in REDDIT_FILES.values()]
