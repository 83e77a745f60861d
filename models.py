"""Models and tokenizers: from a folder or the Hugging Face hub (failing in seconds when it cannot be reached), the
small GPT-2 trained from scratch when no --model is given, and LoRA adapters for bigger ones."""
import functools
import os
import socket
import urllib.parse
import warnings

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from cli import AlolError

read = {}  # name as given -> folder, of every model and tokenizer loaded: what --resume must find unchanged

EOS = "<|endoftext|>"  # GPT-2's end of text: ends every response (a trained token) and DialoGPT's dialogue turns
TOY_VOCAB = 600  # BPE merges for a ~150-word grammar: whole words, so responses are a few tokens each
TOY_GPT2 = dict(n_embd=128, n_layer=2, n_head=4)  # ~0.5 M parameters: learns the grammar in a minute on 2 CPU cores


@functools.lru_cache(maxsize=None)
def hub_unreachable(host: str) -> str:
    """Why the hub cannot be reached, or "": one 3-second probe per run instead of a minute of retries."""
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return ""
    except OSError as e:
        return str(e)


def hub_path(name: str, repo_type: str = "model") -> str:
    """A local folder; a Hugging Face id when the hub answers (from_pretrained then fetches what the cache lacks);
    else the id's folder in the cache. Anything else fails within seconds with a message."""
    if os.path.isdir(name):
        return name
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, not an id of the form owner/name
        raise AlolError(f"{name}: no such folder")
    import huggingface_hub

    host = urllib.parse.urlparse(huggingface_hub.constants.ENDPOINT).hostname
    why = "HF_HUB_OFFLINE is set" if huggingface_hub.constants.HF_HUB_OFFLINE else hub_unreachable(host)
    if not why:
        return name
    try:
        return huggingface_hub.snapshot_download(name, repo_type=repo_type, local_files_only=True)
    except Exception:
        raise AlolError(f"{name!r} is not a local folder, not in the Hugging Face cache, and the hub ({host}) "
                        f"cannot be reached ({why}). Download it where the hub is reachable, or pass a local "
                        "path.") from None


def from_pretrained(cls, name: str, **kwargs):
    """cls.from_pretrained(name) through hub_path; a folder that is not a model, a missing, incomplete or corrupt
    download is one line of error."""
    path = read[name] = hub_path(name)
    transformers.utils.logging.disable_progress_bar()  # per-file load and save bars would drown alol's
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise AlolError(f"{name}: not a Hugging Face model folder (no config.json)")
    try:
        return cls.from_pretrained(path, **kwargs)
    except Exception as e:  # OSError, ValueError, safetensors' errors: transformers' first line says what is wrong
        first = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise AlolError(f"cannot load {name!r} with {cls.__name__}: {first}") from None


def load_policy(path: str, args):
    """A causal LM on args.device: fp32 weights for full training (bf16 autocast computes); with LoRA on CUDA the
    frozen base is stored in bf16."""
    bf16_base = args.lora_r and args.bf16 and args.device.startswith("cuda")
    dtype = torch.bfloat16 if bf16_base else torch.float32
    return from_pretrained(transformers.AutoModelForCausalLM, path, dtype=dtype).to(args.device)


def load_tokenizer(path: str):
    tok = from_pretrained(transformers.AutoTokenizer, path)
    tok.pad_token = tok.pad_token or tok.eos_token  # GPT-2 has no pad token; padding is masked anyway
    return tok


def bpe_tokenizer(records: list):
    """Without --model: a byte-level BPE trained on the training text in well under a second (no download)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOY_VOCAB, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([t for r in records for t in (r["prompt"], r["response"])], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS)


def tiny_gpt2(tok, args):
    """Without --model: a small GPT-2 (TOY_GPT2) trained from scratch, fast on 2 CPU cores."""
    positions = args.max_prompt_len + max(args.max_response_len, args.eval_max_new_tokens)
    config = transformers.GPT2Config(vocab_size=len(tok), n_positions=positions, **TOY_GPT2,
                                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
    return transformers.GPT2LMHeadModel(config)


def lora_targets(args):
    """--lora-targets for peft: all-linear, or a list of module names (peft reads one string as a regular expression
    for the whole module name)."""
    return args.lora_targets if args.lora_targets == "all-linear" else args.lora_targets.split(",")


def for_training(policy, args):
    """With --lora-r: a fresh LoRA adapter on `policy` (peft, in place), returned; else None. With
    --gradient-checkpointing: activations recomputed in the backward pass."""
    adapter = None
    if args.lora_r:
        import peft

        with warnings.catch_warnings():  # two warnings about peft and transformers, not about this run:
            # GPT-2's layers are Conv1D, whose weight is stored transposed; peft notices and sets fan_in_fan_out itself.
            warnings.filterwarnings("ignore", "fan_in_fan_out is set to False but the target module is `Conv1D`",
                                    UserWarning)
            # peft reads the deprecated `is_gradient_checkpointing` property (transformers 5), checkpointing on or off.
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            adapter = peft.get_peft_model(policy, peft.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha,
                                                                  lora_dropout=args.lora_dropout,
                                                                  target_modules=lora_targets(args)))
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return adapter
