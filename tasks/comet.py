"""The paper's COMET task: commonsense inference on ATOMIC-10X, the prompt an event and a relation, the reply the
inferred tail (official preprocess_comet_and_add_rewards.py). One reward, the COMET critic's P(valid): stored in
ATOMIC-10X for train and val, computed for ATOMIC 2020's test set and for generations. README, "The paper's COMET
task"."""
import csv
import json
import os
import random

import reward_models
from caches import fingerprint, scored_splits
from cli import AlolError, opt
from tasks.reddit import SETTINGS as REDDIT_SETTINGS

# The paper's settings (official README command: -ml 30 -vf 16 -e 1 -bs 16 -as 1 -v_bs 32; trainer defaults lr 2e-5,
# 10,000 validation rows): the released comet-distill GPT-2 XL is the reference, not trained again; replies of at
# most 30 tokens; beam 2 with repetition penalty 2.5 (utils/rl_utils.py); every train and test row (n_test is a cap
# above the test set's size). Full training needs ~40 GB; LoRA fits one 24 GB GPU: README, "The paper's COMET task".
PRESET = dict(model="", ref_model="data/comet/comet-distill", data_dir="data/comet", n_train=0, n_val=10_000,
              n_test=1_000_000, max_prompt_len=512, max_response_len=30, epochs=1, lr=2e-5, batch_size=16,
              grad_accum=1, value_samples=2, value_epochs=5, value_lr=2e-5, save_every=1000, eval_every=1 / 16,
              eval_max_new_tokens=30, eval_num_beams=2, eval_repetition_penalty=2.5, eval_batch_size=32)
SETTINGS = {"data_dir": REDDIT_SETTINGS["data_dir"],  # one flag for every task's data folder
            "comet_critic_model": opt("data/comet/comet_critic_keras_to_pytorch", "comet: the COMET critic in the "
                                      "official converted layout, a RobertaModel folder with "
                                      "custom_roberta_classification_head.pt")}
ATOMIC10X, ATOMIC2020_TEST = "ATOMIC10X.jsonl", "test.tsv"
# The seven relations of symbolic knowledge distillation and the words that stand for them in the critic's input
# (official utils/comet_utils.py); ATOMIC 2020 test rows of other relations are dropped.
RELATIONS = {"HinderedBy": "can be hindered by", "xNeed": "but before, PersonX needed",
             "xWant": "as a result, PersonX wants", "xIntent": "because PersonX wanted",
             "xReact": "as a result, PersonX feels", "xAttr": "so, PersonX is seen as",
             "xEffect": "as a result, PersonX"}
# The critic reads people's names, not PersonX/PersonY. The official code draws them from the `names` package and the
# global random state, so a triple's score changes from call to call; here the pair is drawn from this list by a
# generator seeded with the text, so a triple always reads the same names (README: departures).
FIRST_NAMES = ("James", "Mary", "Robert", "Patricia", "John", "Jennifer", "Michael", "Linda", "David", "Elizabeth",
               "William", "Barbara", "Richard", "Susan", "Joseph", "Jessica", "Thomas", "Sarah", "Charles", "Karen",
               "Daniel", "Nancy", "Matthew", "Lisa", "Anthony", "Betty", "Mark", "Sandra", "Steven", "Ashley")
VAL_SEED = 901  # the official trainer's random.sample of 10,000 validation rows (seed 901)


def comet_prompt(head: str, relation: str) -> str:
    return f"<head> {head.strip()} </head> <relation> {relation} </relation> [GEN] "  # the trailing space is official


def head_and_relation(prompt: str) -> tuple:
    """The head and relation of a prompt, parsed back as the official get_batch_comet_reward does."""
    try:
        return (prompt.split("</head>")[0].split("<head>")[1].strip(),
                prompt.split("</relation>")[0].split("<relation>")[1].strip())
    except IndexError:
        raise AlolError(f"not a COMET prompt (<head> … </head> <relation> … </relation> [GEN]): {prompt[:80]!r}") \
            from None


def critic_pair(head: str, relation: str, tail: str, fix_text=str, names=None) -> list:
    """The critic's input pair [event, relation words + tail], PersonX and PersonY (anywhere, the tail included) as
    two different first names (`names`, else drawn by the text); fix_text: ftfy.fix_text, as the official code."""
    if relation not in RELATIONS:
        raise AlolError(f"COMET critic: relation {relation!r} is not one of {', '.join(RELATIONS)}")
    text = f"{head}**SEP**{RELATIONS[relation]} {tail}"
    x, y = names or random.Random(text).sample(FIRST_NAMES, 2)
    return fix_text(text.replace("PersonX", x).replace("PersonY", y)).split("**SEP**")


def reward(args, references=None):
    """The COMET critic's P(valid) of (head, relation, reply), as the official get_batch_comet_reward."""
    path = args.comet_critic_model
    if not os.path.isfile(os.path.join(path, reward_models.CometCritic.HEAD_FILE)):
        raise AlolError(f"--comet-critic-model {path}: no {reward_models.CometCritic.HEAD_FILE}; convert the released "
                        "Keras critic with the official convert_keras_roberta_to_huggingface.py (README, \"The "
                        "paper's COMET task\") and pass its output folder")
    try:
        from ftfy import fix_text
    except ImportError:
        print("warning: ftfy is not installed: the COMET critic reads its input without ftfy.fix_text, unlike the "
              "official code (pip install ftfy)")
        fix_text = str

    def reward_fn(prompts, responses):
        pairs = [critic_pair(*head_and_relation(p), r, fix_text) for p, r in zip(prompts, responses)]
        return {"p_valid_model": reward_models.comet_critic_scores(path, pairs, args)}

    return reward_fn


def atomic10x_splits(args, stored: bool) -> dict:
    """ATOMIC-10X's train and val rows by their `split` field, neither filtered nor de-duplicated (as the official
    code), except that empty tails are dropped; with `stored`, their reward is the critic score they carry
    (p_valid_model). val: n_val rows sampled with seed 901, as the official trainer; train: at most n_train."""
    splits = {"train": [], "val": []}
    with open(os.path.join(args.data_dir, ATOMIC10X), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["split"] in splits and row["tail"].strip():
                record = {"prompt": comet_prompt(row["head"], row["relation"]), "response": row["tail"]}
                splits[row["split"]].append(record | ({"rewards": {"p_valid_model": row["p_valid_model"]}} if stored
                                                      else {}))
    val = random.Random(VAL_SEED).sample(splits["val"], min(args.n_val, len(splits["val"])))
    return {"train": splits["train"][:args.n_train or None], "val": val}


def atomic2020_test(args, critic) -> list:
    """ATOMIC 2020's test.tsv rows of the seven relations; of each (head, relation), the tail the critic scores
    highest (the first on a tie), in order of first appearance, as the official code; the first n_test of those.
    critic(prompts, tails) -> {"p_valid_model": scores}, or None: keep the first tail, unscored (--reward-fn)."""
    with open(os.path.join(args.data_dir, ATOMIC2020_TEST), newline="", encoding="utf-8") as f:
        rows = [row for row in csv.reader(f, delimiter="\t")
                if len(row) == 3 and row[1] in RELATIONS and row[2].strip()]  # alol refuses empty replies
    groups = list(dict.fromkeys((head, relation) for head, relation, _ in rows))[:args.n_test]
    kept = set(groups)
    rows = [row for row in rows if (row[0], row[1]) in kept]
    prompts, tails = [comet_prompt(head, relation) for head, relation, _ in rows], [tail for *_, tail in rows]
    scores = critic(prompts, tails)["p_valid_model"].tolist() if critic else [0.0] * len(rows)
    best = {}
    for (head, relation, _), prompt, tail, p in zip(rows, prompts, tails, scores):
        if (head, relation) not in best or p > best[head, relation][1]:
            best[head, relation] = ({"prompt": prompt, "response": tail}, p)
    return [record | ({"rewards": {"p_valid_model": p}} if critic else {}) for record, p in
            (best[g] for g in groups)]


def load(args, reward_fn=None):
    """The COMET splits with their rewards, and the critic as reward function; cached next to the data under a key of
    the files, the sizes and the critic."""
    paths = [os.path.join(args.data_dir, name) for name in (ATOMIC10X, ATOMIC2020_TEST)]
    if not all(map(os.path.isfile, paths)):
        raise AlolError(f"--data-dir {args.data_dir} must hold {ATOMIC10X} and {ATOMIC2020_TEST}: download "
                        "https://storage.googleapis.com/ai2-mosaic-public/projects/symbolic-knowledge-decoding/"
                        "symbolic-knowledge-distillation.tar.gz (downloaded/ATOMIC10X.jsonl) and ATOMIC 2020 "
                        "(https://allenai.org/data/atomic-2020: atomic2020_data-feb2021/test.tsv) and put both in "
                        f"{os.path.abspath(args.data_dir)}")
    critic = reward_fn or reward(args)  # before the data: a missing critic fails at once
    settings = {k: getattr(args, k) for k in ("n_train", "n_val", "n_test", "reward_fn", "comet_critic_model")}
    cache = os.path.join(args.data_dir, "alol-" + fingerprint(settings, {
        "files": [[os.path.getsize(p), os.path.getmtime(p)] for p in paths]}))
    # The critic scores the test tails here, to pick one per head and relation; training data keeps its stored
    # scores, so only records without rewards (all of them with --reward-fn) are scored by scored_splits.
    parts, critic = scored_splits(cache, ("train", "val", "test"), lambda: {
        **atomic10x_splits(args, stored=not reward_fn), "test": atomic2020_test(args, None if reward_fn else critic)},
        lambda parts: critic)
    return parts, critic


def data_files(args) -> list:
    return [os.path.join(args.data_dir, name) for name in (ATOMIC10X, ATOMIC2020_TEST)]
