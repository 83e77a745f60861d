"""Input checks: data files read strictly, and every check that can run before the reference stage (preflight)."""
import gzip
import importlib.util
import json
import math
import os
import tempfile

from cli import AlolError
from scoring import score
from tracking import clashing_names


def read_jsonl(path: str, flag: str) -> list:
    """Rows {prompt, response, reward | rewards}, read line by line exactly as written: no value is coerced, and
    every error names the file and the line. A gzip-compressed file is read as such."""
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
    if not records:
        raise AlolError(f"{path}: no examples")
    return records


def preflight(args, splits: dict, reward_fn, tok, model):
    """Every check that can run before the reference stage, so a bad input fails in seconds and leaves nothing
    behind."""
    for name, records in splits.items():
        if not records:
            raise AlolError(f"the {name} split is empty")
    if len({r["prompt"] for r in splits["val"]}) < 2:
        raise AlolError("the value head needs 2 or more distinct validation prompts (one is held out)")
    if tok.eos_token_id is None:
        raise AlolError(f"{args.ref_model or args.model}: the tokenizer has no end-of-text token to end responses with")
    if len(tok) > model.get_input_embeddings().num_embeddings:
        raise AlolError(f"{args.ref_model or args.model}: the tokenizer has {len(tok)} tokens, the model embeds only "
                        f"{model.get_input_embeddings().num_embeddings}")
    k = len(score(reward_fn, [r["prompt"] for r in splits["val"][:4]], [r["response"] for r in splits["val"][:4]])) - 1
    for r in (r for records in splits.values() for r in records):  # V(x) is fitted on the reward function's scale
        if not 0 <= sum(r["rewards"].values()) <= k:
            raise AlolError(f"{r.get('source', 'data')}: reward {sum(r['rewards'].values())} is outside [0, {k}], the "
                            f"range of the reward function's {k} components in [0, 1]")
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
