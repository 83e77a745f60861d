"""The paper's knowledge-grounded dialogue tasks: Wizard of Wikipedia (`wow`, the noisy data), FaithDial (`faithdial`,
its hallucination-free edit) and both pooled (`faithdial_wow`); official preprocess_wow_and_add_rewards.py. The prompt
is the wizard's checked knowledge sentence and the dialogue so far, the reply the wizard's turn. Four rewards:
faithfulness, fluency, engagement, diversity. tasks/faithdial.py and tasks/faithdial_wow.py are this module under
their names (args.task picks the splits). README, "The paper's WoW and FaithDial tasks"."""
import copy
import json
import os
import random

from caches import fingerprint, scored_splits
from cli import AlolError, opt
from models import EOS, hub_path, load_tokenizer
from reward_models import classifier_scores
from tasks.reddit import SETTINGS as REDDIT_SETTINGS, acceptable_label, tfidf_reward

# The paper's settings (official README commands: NLL reference -e 6, methods -e 3, -vf 2 -bs 8 -as 2 -v_bs 32; the
# trainer's lr 2e-5 and -ml 128; beam 2 with repetition penalty 2.5): DialoGPT-medium, all of every split. One 24 GB
# GPU, as Reddit's: README, "The paper's Reddit task".
PRESET = dict(model="microsoft/DialoGPT-medium", data_dir="data/wow", n_train=0, n_val=100_000, n_test=100_000,
              max_prompt_len=512, max_response_len=128, ref_epochs=6, ref_lr=2e-5, epochs=3, lr=2e-5, batch_size=8,
              grad_accum=2, value_samples=2, value_epochs=5, value_lr=2e-5, save_every=1000, eval_every=0.5,
              eval_max_new_tokens=128, eval_num_beams=2, eval_repetition_penalty=2.5, eval_batch_size=32)
SETTINGS = {**{k: REDDIT_SETTINGS[k] for k in ("data_dir", "fluency_model", "depth_model")},  # shared flags
            "faithdial_dataset": opt("McGill-NLP/FaithDial", "wow, faithdial, faithdial_wow: FaithDial, a Hugging "
                                     "Face dataset id or a folder of train.jsonl, validation.jsonl, test.jsonl in its "
                                     "layout"),
            "faithcritic_model": opt("McGill-NLP/roberta-large-faithcritic", "wow faithfulness: P(faithful) of "
                                     "(knowledge, reply)")}
REWARD_MODELS = ("faithcritic_model", "fluency_model", "depth_model")
WOW_TRAIN, WOW_VAL = "train.json", "valid_topic_split.json"  # the official val: the unseen-topic split
FAITHDIAL_SPLITS = ("train", "validation", "test")
HISTORY_MAX_TOKENS = 400  # the official history compression: earliest turns dropped until the history fits
SHUFFLE_SEED = 901  # faithdial_wow: WoW and FaithDial training rows shuffled together, as the official random.seed


def wow_turns(dialogues: list) -> list:
    """The official extract_wow_dialogs: every wizard turn with a checked sentence and a history before it, as
    {response, history (the raw earlier turns), knowledge (the checked sentence)}. A wizard turn with no checked
    sentence is skipped and left out of the history; one with `no_passages_used` (or the dialogue's first) is not a
    training example but stays in the history."""
    turns = []
    for dialogue in dialogues:
        history = []
        for utterance in dialogue["dialog"]:
            if "Wizard" in utterance["speaker"]:
                if not utterance["checked_sentence"]:
                    continue
                knowledge = list(utterance["checked_sentence"].values())[0]
                if history and knowledge != "no_passages_used":
                    turns.append({"response": utterance["text"], "history": copy.copy(history), "knowledge": knowledge})
                history.append(utterance["text"])
            elif "Apprentice" in utterance["speaker"]:
                history.append(utterance["text"])
            else:
                raise AlolError(f"Wizard of Wikipedia: unknown speaker {utterance['speaker']!r}")
    return turns


def dialogue_record(turn: dict, tok) -> dict:
    """The official prompt `Knowledge: K<|endoftext|>H<|endoftext|>`, H the turns joined by <|endoftext|> less its
    earliest turns while it is over 400 policy tokens (a single turn over 400 stays whole: the official code failed);
    the reply stripped (alol ends it with <|endoftext|> itself, as the official reference)."""
    history = EOS.join(turn["history"]).strip()
    while EOS in history and len(tok(history)["input_ids"]) > HISTORY_MAX_TOKENS:
        history = history.split(EOS, 1)[1]
    return {"prompt": f"Knowledge: {turn['knowledge'].strip()}{EOS}{history}{EOS}",
            "response": turn["response"].strip()}


def read_wow(args, name: str) -> list:
    with open(os.path.join(args.data_dir, name), encoding="utf-8") as f:
        return wow_turns(json.load(f))


def faithdial_rows(args) -> dict:
    """FaithDial's train, validation and test rows ({response, history, knowledge, ...}): a folder of them as
    {split}.jsonl, or the hub dataset's parquet export (its loading script does not run under datasets >= 4)."""
    import datasets

    datasets.disable_progress_bars()
    source = args.faithdial_dataset
    try:
        if os.path.isdir(source):
            data = datasets.load_dataset(source)
        else:
            hub_path(source, "dataset")  # an unreachable hub with nothing cached fails here, at once
            data = datasets.load_dataset(source, revision="refs/convert/parquet",
                                         data_files={s: f"plain_text/{s}/*.parquet" for s in FAITHDIAL_SPLITS})
        return {split: data[split].to_list() for split in FAITHDIAL_SPLITS}
    except Exception as e:
        raise AlolError(f"--faithdial-dataset {source}: cannot load its train, validation and test splits "
                        f"({type(e).__name__}: {str(e)[:200]}); load McGill-NLP/FaithDial once where the hub is "
                        "reachable, or pass a folder with train.jsonl, validation.jsonl and test.jsonl") from None


def dialogue_splits(args, tok) -> dict:
    """The official splits: wow trains on WoW train and validates on WoW's unseen-topic split; faithdial on FaithDial;
    faithdial_wow on both (the training rows shuffled together). All test on FaithDial's test split. Replies that are
    empty once stripped are dropped (alol's data refuses them)."""
    faithdial = faithdial_rows(args)
    if args.task == "wow":
        train, val = read_wow(args, WOW_TRAIN), read_wow(args, WOW_VAL)
    elif args.task == "faithdial":
        train, val = faithdial["train"], faithdial["validation"]
    else:
        train, val = read_wow(args, WOW_TRAIN) + faithdial["train"], read_wow(args, WOW_VAL) + faithdial["validation"]
        random.Random(SHUFFLE_SEED).shuffle(train)
    caps = {"train": args.n_train or None, "val": args.n_val, "test": args.n_test}
    return {name: [r for r in (dialogue_record(t, tok) for t in turns) if r["response"]][:caps[name]]
            for name, turns in (("train", train), ("val", val), ("test", faithdial["test"]))}


def faithful_label(config) -> int:
    return 0  # McGill-NLP/roberta-large-faithcritic: 0 = faithful ("entailment"), as the official code reads it


def reward(args, references: list):
    """The four official rewards in [0, 1] (utils/rl_utils.py, the "WOW" map): faithfulness P(faithful) of (knowledge,
    reply) by FaithCritic, fluency P(acceptable) of the reply by CoLA, engagement sigmoid(DialogRPT-depth) of the
    history followed by the reply, diversity the tf-idf reward of tasks/reddit.py fitted on `references`."""
    paths = {k: hub_path(getattr(args, k)) for k in REWARD_MODELS}  # an unreachable hub fails here, at once
    diversity = tfidf_reward(references)

    def reward_fn(prompts, responses):
        knowledge = [p.split(EOS, 1)[0][len("Knowledge:"):] for p in prompts]  # with its leading space, as official
        threads = [p.split(EOS, 1)[1] + r for p, r in zip(prompts, responses)]  # turn<eos>…turn<eos>reply
        return {"faithfulness": classifier_scores(paths["faithcritic_model"], knowledge, args, faithful_label,
                                                  responses),
                "fluency": classifier_scores(paths["fluency_model"], responses, args, acceptable_label),
                "engagement": classifier_scores(paths["depth_model"], threads, args),
                "diversity": diversity(responses)}

    return reward_fn


def load(args, reward_fn=None):
    """The task's splits with their rewards, and the reward function; cached next to the WoW files under a key of the
    task, the files, the sizes, the policy's tokenizer (it measures histories) and the reward models."""
    if not os.path.isfile(os.path.join(args.data_dir, WOW_TRAIN)) or \
            (args.task != "faithdial" and not os.path.isfile(os.path.join(args.data_dir, WOW_VAL))):
        raise AlolError(f"--data-dir {args.data_dir} must hold Wizard of Wikipedia's {WOW_TRAIN} and {WOW_VAL}: "
                        "download http://parl.ai/downloads/wizard_of_wikipedia/wizard_of_wikipedia.tgz, unpack it and "
                        f"put its files in {os.path.abspath(args.data_dir)}")
    if not (args.ref_model or args.model):
        raise AlolError(f"--task {args.task} measures histories in the policy's tokens: give --model or --ref-model")
    settings = {k: getattr(args, k) for k in ("task", "model", "ref_model", "n_train", "n_val", "n_test", "reward_fn",
                                              "faithdial_dataset", *REWARD_MODELS)}
    local = sorted(os.path.join(d, f) for d, _, names in os.walk(args.faithdial_dataset) for f in names)
    stamps = {"files": [[os.path.getsize(p), os.path.getmtime(p)] for p in data_files(args) + local]}
    cache = os.path.join(args.data_dir, "alol-" + fingerprint(settings, stamps))
    # tf-idf is fitted on the WoW training replies, as stored (unstripped), for all three tasks, as the official code
    parts, reward_fn = scored_splits(
        cache, ("train", "val", "test"), lambda: dialogue_splits(args, load_tokenizer(args.ref_model or args.model)),
        lambda parts: reward_fn or reward(args, [t["response"] for t in read_wow(args, WOW_TRAIN)]))
    return parts, reward_fn


def data_files(args) -> list:
    return [os.path.join(args.data_dir, name) for name in (WOW_TRAIN, WOW_VAL)
            if args.task != "faithdial" or name == WOW_TRAIN]
