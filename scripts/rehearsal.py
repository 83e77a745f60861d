"""Real-size rehearsal of `python alol.py --task reddit`: python scripts/rehearsal.py

    python scripts/rehearsal.py                       # CPU or CUDA, whichever is here; a few steps, a few prompts
    python scripts/rehearsal.py --n-train 64 --n-prompts 16 --report rehearsal.json   # the GPU check's budget

No download: it builds randomly initialised models of the paper's architectures and sizes and saves them to a
temporary folder, writes Kaggle-format CSVs, and then
  1. measures one optimiser step of the Reddit preset in a fresh process: DialoGPT-medium (GPT-2 medium, 355 M
     parameters), AdamW, batch 8 x grad-accum 2, every sequence 300 tokens (the preprocessing's cap), 128 of them
     response tokens, log-probs through kernels.linear_token_logprobs; bf16 autocast on CUDA, as alol.py;
  2. runs the full `python alol.py --task reddit ...` command line on those files, with the preset's batch, sequence
     lengths, generation settings and all five reward models, and a small budget (--n-train examples, --n-prompts
     validation and test prompts per CSV file, one epoch per stage, one method);
and prints per stage the wall time and the peak memory: resident set size of the process (VmHWM, reset at every
stage) and, on CUDA, torch.cuda.max_memory_allocated (reset at every stage).

Models (random weights, the published configurations):
  policy    DialoGPT-medium = GPT-2 medium: 24 layers, width 1024, 16 heads, 1024 positions, vocabulary 50257
  depth, updown   DialogRPT-depth/-updown = GPT-2 medium with a 1-output sequence-classification head
  fluency, safety  roberta-base-CoLA / twitter-roberta-base-offensive = RoBERTa-base (12 layers, width 768) with a
                   2-way head
The tokenizer is a byte-level BPE with GPT-2's vocabulary size (50257: 256 bytes, 50000 merges of letters, and
<|endoftext|>), built without training. The CSV texts are random letter words (about 3 tokens each): every pair is
150-300 tokens, the range the preprocessing keeps, and every reply at most 128 tokens.
"""
import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = "<|endoftext|>"
VOCAB = 50257
KAGGLE_COLUMNS = ["id", "parent_id", "subreddit_id", "link_id", "text", "score", "ups", "author", "controversiality",
                  "parent_link_id", "parent_text", "parent_score", "parent_ups", "parent_author",
                  "parent_controversiality"]
GPT2_MEDIUM = dict(vocab_size=VOCAB, n_positions=1024, n_embd=1024, n_layer=24, n_head=16)
ROBERTA_BASE = dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                    bos_token_id=0, eos_token_id=2)
STEP_TOKENS, STEP_RESPONSE = 300, 128  # the preprocessing's cap per pair, and the preset's response length


def rss_peak_mb(reset=False):
    """Peak resident set size of this process since the last reset (VmHWM), MiB; reset=True starts a new window."""
    with open("/proc/self/status") as f:
        peak = int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) / 1024
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS
    return peak


def tokenizer():
    """A byte-level BPE with 50257 entries: the 256 byte symbols, 50000 merges (a space + letter, letter pairs, then
    letter triples and quadruples in order), and <|endoftext|> last, as GPT-2's."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = []
    letters = "abcdefghijklmnopqrstuvwxyz"

    def add(a, b):
        if len(vocab) < VOCAB - 1 and a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append((a, b))

    for c in letters:
        add("Ġ", c)  # the byte-level space before a word
    words = list(letters)
    while len(vocab) < VOCAB - 1:
        words = [w + c for w in words for c in letters]
        for w in words:
            add(w[:-1], w[-1])
    vocab[EOS] = VOCAB - 1
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.add_special_tokens([EOS])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS)


def kaggle_csvs(data_dir, tok, rows_per_file, seed=0):
    """comments_positive.csv and comments_negative.csv in Kaggle's schema: random-word parents and replies whose
    pair (parent EOS reply EOS) is 150-300 tokens, replies up to 128 tokens, both at most 100 words."""
    import pandas as pd

    rng = random.Random(seed)

    def text(n_words):
        return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
                        for _ in range(n_words))

    os.makedirs(data_dir, exist_ok=True)
    for name, sign in [("comments_positive.csv", 1), ("comments_negative.csv", -1)]:
        rows = []
        while len(rows) < rows_per_file:
            parent, reply = text(rng.randint(30, 80)), text(rng.randint(10, 45))
            n_reply = len(tok(reply + EOS)["input_ids"])
            if n_reply <= STEP_RESPONSE and 150 <= len(tok(parent + EOS)["input_ids"]) + n_reply <= STEP_TOKENS:
                rows.append({"parent_text": parent, "text": reply, "score": sign * rng.randint(6, 500),
                             "parent_score": rng.randint(1, 500)})
        frame = pd.DataFrame([{c: r.get(c, f"x{i}") for c in KAGGLE_COLUMNS} for i, r in enumerate(rows)])
        frame.to_csv(os.path.join(data_dir, name), index=False)


def build(folder, rows_per_file):
    """Random models of the real sizes, their tokenizer and the CSVs, saved under folder; returns the flags."""
    import torch
    import transformers

    torch.manual_seed(0)
    tok = tokenizer()
    eos = dict(bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1)
    builders = {
        "policy": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_MEDIUM, **eos)),
        "depth": lambda: transformers.GPT2ForSequenceClassification(
            transformers.GPT2Config(**GPT2_MEDIUM, **eos, num_labels=1)),
        "updown": lambda: transformers.GPT2ForSequenceClassification(
            transformers.GPT2Config(**GPT2_MEDIUM, **eos, num_labels=1)),
        "fluency": lambda: transformers.RobertaForSequenceClassification(
            transformers.RobertaConfig(**ROBERTA_BASE, num_labels=2)),
        "safety": lambda: transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
            **ROBERTA_BASE, num_labels=2, id2label={0: "non-offensive", 1: "offensive"},
            label2id={"non-offensive": 0, "offensive": 1})),
    }
    sizes = {}
    for name, make in builders.items():
        model = make()
        sizes[name] = sum(p.numel() for p in model.parameters())
        model.save_pretrained(os.path.join(folder, name))
        tok.save_pretrained(os.path.join(folder, name))
        del model
    kaggle_csvs(os.path.join(folder, "data"), tok, rows_per_file)
    return sizes


def step_worker(folder, device):
    """One optimiser step of the Reddit preset in this (fresh) process; prints one JSON line of figures."""
    import torch
    import transformers

    sys.path.insert(0, ROOT)
    import kernels

    model = transformers.GPT2LMHeadModel.from_pretrained(os.path.join(folder, "policy"), dtype=torch.float32)
    model.to(device).train()
    for m in model.modules():  # alol.py trains with dropout off (the ratio is exactly 1 at step 0)
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, eps=1e-8, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, VOCAB - 1, (8, STEP_TOKENS), generator=gen).to(device) for _ in range(2)]
    mask = torch.zeros(8, STEP_TOKENS - 1, device=device)
    mask[:, -STEP_RESPONSE:] = 1  # the response's tokens: the last 128 of each sequence
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss, base_cuda = rss_peak_mb(reset=True), torch.cuda.memory_allocated() / 2**20 if cuda else 0.0
    start = time.perf_counter()
    for ids in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            hidden = model.transformer(input_ids=ids).last_hidden_state
            logp = kernels.linear_token_logprobs(hidden[:, :-1], model.lm_head.weight, ids[:, 1:], mask)
        (-(logp.sum(1)).mean() / len(batches)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    out = dict(device=device, params=params, seconds=time.perf_counter() - start,
               state_mb=16 * params / 2**20,  # fp32 weights, gradients, AdamW's two moments: 4 x 4 bytes each
               rss_before_mb=base_rss, rss_peak_mb=rss_peak_mb())
    if cuda:
        out.update(cuda_before_mb=base_cuda, cuda_peak_mb=torch.cuda.max_memory_allocated() / 2**20,
                   gpu=torch.cuda.get_device_name())
    print(json.dumps(out))


def probe_worker(events_path, argv):
    """Run alol.py's command line in this process, writing one JSON line per stage (a progress bar's label and
    what ran until the next bar) with its wall time and peak memory."""
    import torch
    import tqdm.std

    cuda = torch.cuda.is_available()
    events = open(events_path, "a", buffering=1)
    current = {"label": "start: load data, models", "t0": time.perf_counter()}
    rss_peak_mb(reset=True)

    def switch(label):
        now = time.perf_counter()
        entry = {"stage": current["label"], "seconds": now - current["t0"], "rss_peak_mb": rss_peak_mb(reset=True)}
        if cuda:
            entry["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        events.write(json.dumps(entry) + "\n")
        current.update(label=label, t0=now)

    init, close = tqdm.std.tqdm.__init__, tqdm.std.tqdm.close

    def bar_init(self, *a, **kw):
        switch(kw.get("desc") or "unlabelled bar")
        self._rehearsal_open = True
        init(self, *a, **kw)

    def bar_close(self):
        if getattr(self, "_rehearsal_open", False):
            self._rehearsal_open = False
            switch("between bars: load, save, score")
        close(self)

    tqdm.std.tqdm.__init__, tqdm.std.tqdm.close = bar_init, bar_close
    sys.argv = [os.path.join(ROOT, "alol.py"), *argv]
    sys.path.insert(0, ROOT)
    import runpy
    code = 0
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code or 0
    switch("end")
    events.close()
    sys.exit(code)


def run_child(args, env=None):
    """A fresh Python process for a worker; returns its stdout (stderr passes through)."""
    cmd = [sys.executable, os.path.abspath(__file__), *args]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"rehearsal: {' '.join(cmd)} failed with exit code {done.returncode}")
    return done.stdout


def phases(events):
    """Stages as a reader knows them: a training, generation, value-head or log-prob bar opens one (repeated bars of
    one loop, like the sampled and the beam-search generation, stay one), and the reward models' bars and the
    loading, saving and scoring between bars belong to the stage they follow."""
    rows = []
    for e in events:
        label = e["stage"]
        scoring = label == "reward" or label.startswith("reward ")  # a reward model's bar, or all five's
        follows = scoring or label.startswith("between bars") or label == "end"
        if rows and (follows or (label == rows[-1]["label"] and not rows[-1]["scored"])):
            row = rows[-1]
            row["seconds"] += e["seconds"]
            for key in ("rss_peak_mb", "cuda_peak_mb"):
                if key in e:
                    row[key] = max(row[key], e[key])
            row["scored"] = row["scored"] or scoring
        else:
            rows.append(dict(e, label=label, scored=False))
    for row in rows:
        row["stage"] = STAGE_NAMES.get(row["label"], row["label"]) + (", score" if row["scored"] else "")
    return rows


# Progress-bar labels of alol.py and what their stage does.
STAGE_NAMES = {"start: load data, models": "start: read the CSVs, preprocess, load the policy",
               "generate": "generate", "value head": "value head (train V(x))",
               "reference log-probs": "reference log-probs and V(x) of the training set"}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--n-train", type=int, default=16, help="training examples (16 = one optimiser step per epoch)")
    p.add_argument("--n-prompts", type=int, default=2,
                   help="validation and test prompts per CSV file (the GPU check: 16, one full generation batch)")
    p.add_argument("--algo", default="a_lol", help="methods after the reference (alol.py --algo)")
    p.add_argument("--skip-step", action="store_true", help="skip the optimiser-step measurement")
    p.add_argument("--skip-run", action="store_true", help="skip the alol.py run")
    p.add_argument("--keep", metavar="DIR", help="build in DIR and keep it (default: a temporary folder)")
    p.add_argument("--report", metavar="FILE", help="also write all figures as JSON to FILE")
    p.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        kind, *rest = a.worker
        return step_worker(*rest) if kind == "step" else probe_worker(rest[0], rest[1:])
    import torch
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    folder = a.keep or tempfile.mkdtemp(prefix="alol-rehearsal-")
    report = {"device": device, "command": " ".join(sys.argv)}
    try:
        start = time.perf_counter()
        rows = a.n_train + 2 * a.n_prompts + 4  # some spare rows: the split keeps what the cap allows
        report["params"] = build(folder, rows)
        report["build_seconds"] = time.perf_counter() - start
        print(f"built models and data in {folder} in {report['build_seconds']:.0f} s: "
              + ", ".join(f"{k} {v / 1e6:.0f} M" for k, v in report["params"].items()), flush=True)
        if not a.skip_step:
            report["step"] = json.loads(run_child(["--worker", "step", folder, device]).strip().splitlines()[-1])
            print_step(report["step"])
        if not a.skip_run:
            events = os.path.join(folder, "stages.jsonl")
            m = {k: os.path.join(folder, k) for k in ("policy", "fluency", "safety", "depth", "updown")}
            argv = ["--task", "reddit", "--data-dir", os.path.join(folder, "data"), "--model", m["policy"],
                    "--fluency-model", m["fluency"], "--safety-model", m["safety"], "--depth-model", m["depth"],
                    "--updown-model", m["updown"], "--device", device, "--n-train", str(a.n_train),
                    "--n-val", str(a.n_prompts), "--n-test", str(a.n_prompts), "--ref-epochs", "1", "--epochs", "1",
                    "--value-epochs", "1", "--algo", a.algo, "--out-dir", os.path.join(folder, "run"),
                    "--cache-dir", os.path.join(folder, "cache")]
            # Trackers (--report-to, tensorboard by default where alol.py has it) are no part of the rehearsal, and
            # their packages may be missing on a GPU machine.
            usage = subprocess.run([sys.executable, os.path.join(ROOT, "alol.py"), "--help"], capture_output=True,
                                   text=True).stdout
            argv += ["--report-to", "none"] if "--report-to" in usage else []
            report["alol_command"] = "python alol.py " + " ".join(argv)
            print(report["alol_command"], flush=True)
            env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
            start = time.perf_counter()
            sys.stdout.write(run_child(["--worker", "probe", events, *argv], env))
            report["run_seconds"] = time.perf_counter() - start
            with open(events) as f:
                report["events"] = [json.loads(line) for line in f]
            report["stages"] = phases(report["events"])
            print_stages(report["stages"], report["run_seconds"])
    finally:
        if not a.keep:
            shutil.rmtree(folder, ignore_errors=True)
    if a.report:
        with open(a.report, "w") as f:
            json.dump(report, f, indent=1)


def print_step(s):
    gib = 1024
    line = (f"\none optimiser step, batch 8 x grad-accum 2, {STEP_TOKENS} tokens per sequence ({STEP_RESPONSE} "
            f"response), {s['params'] / 1e6:.0f} M parameters on {s['device']}: {s['seconds']:.1f} s; fp32 weights + "
            f"gradients + AdamW state = {s['state_mb'] / gib:.2f} GiB; peak RSS {s['rss_peak_mb'] / gib:.2f} GiB "
            f"({s['rss_before_mb'] / gib:.2f} GiB before the step)")
    if "cuda_peak_mb" in s:
        line += (f"; torch.cuda.max_memory_allocated {s['cuda_peak_mb'] / gib:.2f} GiB "
                 f"({s['cuda_before_mb'] / gib:.2f} GiB before the step) on {s['gpu']}")
    print(line, flush=True)


def print_stages(stages, total):
    cuda = any("cuda_peak_mb" in s for s in stages)
    print("\n| stage (progress bar) | wall s | peak RSS GiB |" + (" peak CUDA allocated GiB |" if cuda else ""))
    print("|---|---|---|" + ("---|" if cuda else ""))
    for s in stages:
        print(f"| {s['stage']} | {s['seconds']:.1f} | {s['rss_peak_mb'] / 1024:.2f} |"
              + (f" {s['cuda_peak_mb'] / 1024:.2f} |" if cuda else ""))
    print(f"| whole run | {total:.1f} | {max(s['rss_peak_mb'] for s in stages) / 1024:.2f} |"
          + (f" {max(s['cuda_peak_mb'] for s in stages) / 1024:.2f} |" if cuda else ""), flush=True)


if __name__ == "__main__":
    main()
