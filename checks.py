"""Input checks: data files read strictly, and every check that can run before the reference stage (preflight)."""
import gzip
import importlib.util
import json
import math
import os
import tempfile

import torch.nn as nn
from transformers.pytorch_utils import Conv1D

import models
from cli import AlolError
from scoring import score
from tracking import clashing_names


def read_jsonl(path: str, flag: str) -> list:
    """Rows {prompt, response, reward | rewards, and optionally rejected: {response, reward | rewards}}, read line by
    line exactly as written: no value is coerced, and every error names the file and the line. A gzip-compressed file
    is read as such."""
    if not os.path.isfile(path):
        raise AlolError(f"{flag}: no such file: {path}")
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    records, names = [], None
    with (gzip.open if gzipped else open)(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:  # json.loads rejects two objects on one line ("Extra data")
                row = json.loads(line.decode("utf-8")) if line.strip() else None
            except UnicodeDecodeError as bad:
                raise AlolError(f"{where}: not UTF-8 text (byte {line[bad.start]:#04x} at column {bad.start + 1})") \
                    from None
            except json.JSONDecodeError as bad:
                raise AlolError(f"{where}: not valid JSON ({bad.msg} at column {bad.colno})") from None
            if row is None:
                continue
            for key in ("prompt", "response"):
                if not isinstance(row, dict) or not isinstance(row.get(key), str):
                    raise AlolError(f"{where}: missing field {key!r} (a string)")
                if not row[key].strip():
                    raise AlolError(f"{where}: empty {key!r}")
            rewards = row["rewards"] if "rewards" in row else {"reward": row["reward"]} if "reward" in row else None
            if not isinstance(rewards, dict) or not rewards:
                raise AlolError(f"{where}: missing field 'reward' (a number) or 'rewards' (a dict of numbers)")
            for k, v in rewards.items():  # bool is an int to Python, "0.5" is not a number: both refused
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise AlolError(f"{where}: reward {k!r} is not a finite number: {v!r}")
            if clashing_names(rewards):
                raise AlolError(f"{where}: reward component {clashing_names(rewards)[0]!r} has the name of a column of "
                                "the results table or of the summed reward: rename it")
            if sorted(rewards) != (names := names or sorted(rewards)):
                raise AlolError(f"{where}: reward components {sorted(rewards)} differ from the file's first row's "
                                f"{names}")
            records.append({"prompt": row["prompt"], "response": row["response"], "rewards": rewards, "source": where})
            if "rejected" in row:  # optional: a dispreferred reply to the same prompt, with its reward (dpo, pro)
                other = row["rejected"] if isinstance(row["rejected"], dict) else {}
                worse = other.get("rewards", {"reward": other["reward"]} if "reward" in other else None)
                if not isinstance(other.get("response"), str) or not other["response"].strip() \
                        or not isinstance(worse, dict) or sorted(worse) != names \
                        or not all(type(v) in (int, float) and math.isfinite(v) for v in worse.values()):
                    raise AlolError(f"{where}: 'rejected' must be {{\"response\": a non-empty string, \"reward\" or "
                                    f"\"rewards\": finite numbers named as the row's {names}}}")
                records[-1]["rejected"] = {"response": other["response"], "rewards": worse}
    if not records:
        raise AlolError(f"{path}: no examples")
    return records


def preflight(args, splits: dict, reward_fn, tok, model, pair_algos=()):
    """Every check that can run before the reference stage, so a bad input fails in seconds and leaves nothing
    behind. pair_algos: the methods of this run that train on pairs (dpo, pro)."""
    for name, records in splits.items():
        if not records:
            raise AlolError(f"the {name} split is empty")
    unpaired = sum("rejected" not in r for r in splits["train"])
    if pair_algos and unpaired:
        raise AlolError(f"--algo {pair_algos[0]} trains on pairs of replies: {unpaired} of the {len(splits['train'])} "
                        "training examples have no dispreferred reply (`rejected`); `--algo all` runs the methods the "
                        "data supports")
    if len({r["prompt"] for r in splits["val"]}) < 2:
        raise AlolError("the value head needs 2 or more distinct validation prompts (one is held out)")
    if tok.eos_token_id is None:
        raise AlolError(f"{args.ref_model or args.model}: the tokenizer has no end-of-text token to end responses with")
    if len(tok) > model.get_input_embeddings().num_embeddings:
        raise AlolError(f"{args.ref_model or args.model}: the tokenizer has {len(tok)} tokens, the model embeds only "
                        f"{model.get_input_embeddings().num_embeddings}")
    k = len(score(reward_fn, [r["prompt"] for r in splits["val"][:4]], [r["response"] for r in splits["val"][:4]])) - 1
    for r in (r for records in splits.values() for r in records):  # V(x) is fitted on the reward function's scale
        for part, which in [(r, ""), (r.get("rejected"), " (rejected)")]:
            if part and not 0 <= sum(part["rewards"].values()) <= k:
                raise AlolError(f"{r.get('source', 'data')}{which}: reward {sum(part['rewards'].values())} is outside "
                                f"[0, {k}], the range of the reward function's {k} components in [0, 1]")
    lora_targets(args, model)
    positions(args, splits, tok, model)
    if args.max_response_len == 1:  # responses are never empty, so 1 token is the first that empties them
        print("warning: --max-response-len 1 cuts every response down to its final EOS: nothing else is trained")
    for kind in set(args.report_to.split(",")) - {"none"}:
        if importlib.util.find_spec(kind) is None:
            raise AlolError(f"--report-to {kind}: the {kind} package is not installed (pip install {kind})")
    for flag in ("out_dir", "cache_dir"):
        folder = getattr(args, flag) or "runs"
        while not os.path.exists(folder):
            folder = os.path.dirname(os.path.abspath(folder))
        try:
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            raise AlolError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: cannot write there ({e.strerror})") \
                from None


def lora_targets(args, model):
    """--lora-targets name modules of this model, and not its output layer: the log-prob kernel reads the output
    layer's weight directly (alol.token_logprobs), so an adapter there would never reach the loss."""
    if not args.lora_r or args.lora_targets == "all-linear":  # peft's all-linear leaves the output layer out
        return
    modules = dict(model.named_modules())
    adaptable = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D)  # peft's
    for target in models.lora_targets(args):
        matched = [m for name, m in modules.items() if name == target or name.endswith("." + target)]  # as peft
        if not matched:
            raise AlolError(f"--lora-targets {target}: no module of the model is named so (its layers' modules: "
                            f"{', '.join(sorted({n.rpartition('.')[2] for n in modules if n.count('.') > 2})[:12])})")
        if any(m is model.get_output_embeddings() for m in matched):
            raise AlolError(f"--lora-targets {target}: the output layer cannot take an adapter, the log-prob kernel "
                            "reads its weight directly, so the adapter would never reach the loss")
        for m in (m for m in matched if not isinstance(m, adaptable)):
            raise AlolError(f"--lora-targets {target}: a {type(m).__name__} cannot take a LoRA adapter (linear, "
                            "convolution and embedding layers can)")


def positions(args, splits: dict, tok, model):
    """The longest prompt plus its response (training), and plus --eval-max-new-tokens (generation on the validation
    and test prompts), within the model's positions; the error names the flag to change."""
    limit = next((getattr(model.config, k) for k in ("n_positions", "max_position_embeddings", "n_ctx")
                  if isinstance(getattr(model.config, k, None), int)), None)
    if limit is None or args.max_prompt_len + max(args.max_response_len, args.eval_max_new_tokens) <= limit:
        return  # no limit, or the settings' bound fits: no need to tokenize

    def longest(texts, cut):
        return max(min(len(ids), cut) for ids in tok(texts, add_special_tokens=False)["input_ids"])

    prompt = longest([r["prompt"] for r in splits["train"]], args.max_prompt_len)
    replies = [x["response"] for r in splits["train"] for x in (r, r.get("rejected")) if x]  # pairs' included
    response = longest(replies, args.max_response_len - 1) + 1  # + EOS
    if prompt + response > limit:
        raise AlolError(f"the longest training prompt ({prompt} tokens, --max-prompt-len {args.max_prompt_len}) plus "
                        f"its response ({response}, --max-response-len {args.max_response_len}) exceed the model's "
                        f"{limit} positions: lower --max-prompt-len or --max-response-len")
    prompt = longest([r["prompt"] for name in ("val", "test") for r in splits[name]], args.max_prompt_len)
    if prompt + args.eval_max_new_tokens > limit:
        raise AlolError(f"the longest validation or test prompt ({prompt} tokens, --max-prompt-len "
                        f"{args.max_prompt_len}) plus --eval-max-new-tokens {args.eval_max_new_tokens} exceed the "
                        f"model's {limit} positions: lower --eval-max-new-tokens or --max-prompt-len")


def something_to_learn(advantage, algos: list, out_dir: str):
    """A-LoL trains on A > 0 only: with none, say why instead of training on nothing."""
    if any(algo.startswith("a_lol") for algo in algos) and not (advantage > 0).any():
        raise AlolError(f"every training advantage A = R - V(x) is <= 0 (max {advantage.max():.3f}): the reference "
                        "policy already earns at least the reward of every offline response, so A-LoL has nothing to "
                        "learn from. Check the rewards of --train-file, or use a weaker reference. Run kept in "
                        f"{out_dir}.")
