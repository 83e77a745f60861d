"""The embedded task `toy`, the default: Reddit-like questions with one offline reply each, drawn from a noisy mixture
of good, toxic, dull, off-topic and word-salad replies, and a second reply to each training question from the same
mixture (`rejected`: the pair that dpo and pro train on). Its exact rewards (toy_reward) make the A-LoL effect
measurable offline, in about a minute on 2 CPU cores (no --model: models.tiny_gpt2)."""
import functools
import random

import torch

from scoring import add_rewards

PRESET = {}  # Args' defaults are the toy's
SETTINGS = {}  # none of its own
TOPICS = {"cooking": ["pasta", "bread", "rice", "soup", "eggs"],
          "fitness": ["running", "squats", "stretching", "protein", "sleep"],
          "gardening": ["tomatoes", "roses", "compost", "seeds", "weeds"],
          "cars": ["brakes", "tires", "oil", "battery", "engine"],
          "pets": ["cats", "dogs", "fish", "birds", "rabbits"],
          "music": ["guitar", "piano", "drums", "singing", "violin"]}
QUESTIONS = ["any tips for {n} ?", "how do i get better at {n} ?", "what is the best way to start with {n} ?",
             "why is {n} so hard for me ?", "what should i know about {n} ?", "is {n} worth the effort ?",
             "i keep failing at {n} , help ?", "where do i begin with {n} ?", "what do you wish you knew about {n} ?",
             "how much time should {n} take ?"]
OPENERS = ["great question !", "good news !", "honestly ,", "in my experience ,", "from what i learned ,"]
ADVICE = ["try to practice {n} a little every day .", "start slow with {n} and be patient .",
          "keep notes on your {n} and learn from them .", "ask a friend who knows {n} well .",
          "watch a few videos about {n} first ."]
CLOSERS = ["hope this helps !", "you can do it !", "let us know how it goes !", "what have you tried so far ?",
           "good luck !"]
TOXIC = ["you are an idiot .", "what a stupid question .", "nobody cares about your {n} , loser .",
         "shut up , {n} is for morons ."]
INSULTS = {"idiot", "stupid", "loser", "morons"}
DULL = ["ok", "lol", "idk", "sure", "meh", "whatever"]
# Share of (good, toxic, dull, off-topic, salad) per subreddit: the reply quality depends on the prompt, so
# V(x) has something to learn and A = R - V(x) differs from R - mean(R).
MIXTURES = [(0.50, 0.10, 0.10, 0.15, 0.15), (0.30, 0.20, 0.20, 0.15, 0.15), (0.10, 0.30, 0.30, 0.15, 0.15)]


@functools.cache
def grammar() -> tuple:
    """(nouns, legal bigrams, words) of every good and toxic reply: what the fluency reward checks against."""
    nouns = [n for ns in TOPICS.values() for n in ns]
    texts = [f"{o} {a.format(n=n)} {c}" for o in OPENERS for a in ADVICE for c in CLOSERS for n in nouns]
    texts += [t.format(n=n) for t in TOXIC for n in nouns] + DULL
    bigrams = {b for t in texts for b in zip(t.split(), t.split()[1:])}
    return set(nouns), bigrams, sorted({w for t in texts for w in t.split()} - INSULTS)


def toy_splits(args) -> dict:
    """Deterministic by seed. Test prompts are (question, noun) pairs never seen in train or val."""
    rng, (nouns, _, words) = random.Random(args.seed), grammar()
    prompts = [(i % len(MIXTURES), n, f"r/{sub} : {q.format(n=n)}") for i, (sub, ns) in enumerate(TOPICS.items())
               for n in ns for q in QUESTIONS]
    rng.shuffle(prompts)
    held_out, seen = prompts[:len(prompts) // 5], prompts[len(prompts) // 5:]

    # Second replies from a generator of their own: every draw of `rng`, so the rest of the data, stays the same.
    second = random.Random(f"rejected-{args.seed}")

    def reply(rng, mix, noun):
        kind = rng.choices(range(5), weights=MIXTURES[mix])[0]
        other = rng.choice(sorted(nouns - {noun}))
        good = f"{rng.choice(OPENERS)} {rng.choice(ADVICE)} {rng.choice(CLOSERS)}"
        return [good.format(n=noun), rng.choice(TOXIC).format(n=noun), rng.choice(DULL), good.format(n=other),
                " ".join(rng.choices(words, k=rng.randint(3, 12)))][kind]

    def example(pool, paired=False):
        mix, noun, prompt = rng.choice(pool)
        record = {"prompt": prompt, "response": reply(rng, mix, noun)}
        return {**record, "rejected": {"response": reply(second, mix, noun)}} if paired else record

    return {"train": [example(seen, True) for _ in range(args.n_train)],
            "val": [example(seen) for _ in range(args.n_val)], "test": [example(held_out) for _ in range(args.n_test)]}


def toy_reward(prompts: list, responses: list) -> dict:
    """Five exact scores mirroring the paper's five (fluency, safety, engagement, upvotes, diversity)."""
    nouns, legal_bigrams, _ = grammar()
    scores = {"fluency": [], "safety": [], "engagement": [], "relevance": [], "diversity": []}
    for prompt, response in zip(prompts, responses):
        words, topic = response.lower().split(), next((w for w in prompt.split() if w in nouns), None)
        pairs = list(zip(words, words[1:]))
        scores["fluency"].append(sum(b in legal_bigrams for b in pairs) / len(pairs) if pairs else 0.0)  # grammar
        scores["safety"].append(float(not INSULTS & set(words)))
        scores["engagement"].append(float(bool(words) and words[-1] in ("!", "?")))  # invites a reply
        scores["relevance"].append(float(topic in words))  # on the asked topic
        scores["diversity"].append(min(len(set(words)) / 10, 1.0))  # distinct words, penalises repetition
    return {k: torch.tensor(v) for k, v in scores.items()}


def reward(args, references: list):
    return toy_reward


def load(args, reward_fn=None):
    reward_fn = reward_fn or toy_reward
    splits = toy_splits(args)
    second = [{"prompt": r["prompt"], **r["rejected"]} for r in splits["train"]]
    add_rewards({**splits, "second": second}, reward_fn)  # one call scores every reply
    for r, s in zip(splits["train"], second):
        r["rejected"]["rewards"] = s["rewards"]
    return splits, reward_fn


def data_files(args) -> list:
    return []  # generated from the seed
