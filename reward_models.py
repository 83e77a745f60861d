"""Reward components from Hugging Face classifiers and reward models, loaded for each call: what the tasks share."""
import os

import torch
import torch.nn as nn
import transformers

from cli import AlolError
from models import from_pretrained, load_tokenizer
from progress import Stage

CLASSIFIER_MAX_TOKENS = 512  # RoBERTa's position limit; DialogRPT (GPT-2) reads the same cut of parent + reply


@torch.no_grad()
def classifier_scores(path: str, texts: list, args, label=None, pairs=None, max_tokens=CLASSIFIER_MAX_TOKENS):
    """P(label) under a sequence classifier, or the sigmoid of a reward model's one logit (DialogRPT, HH's), for
    each text or (text, pair) such as (question, answer). Inputs longer than max_tokens lose their start: the reply
    being scored is at the end. Loaded for this call and freed after it, so reward models never share the GPU with
    the policy's training; fp16 on CUDA. OpenAssistant's reward checkpoints load too (register)."""
    register()
    tok = load_tokenizer(path)
    tok.padding_side, tok.truncation_side = "right", "left"  # right padding: the positions 0..n-1 of training
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    model, loading = from_pretrained(transformers.AutoModelForSequenceClassification, path, dtype=dtype,
                                     output_loading_info=True)
    untrained = sorted(set(loading["missing_keys"]) & dict(model.named_parameters()).keys())
    if untrained:  # e.g. a causal LM: transformers gives it a classification head of random weights
        kind = ", ".join(model.config.architectures or []) or model.config.model_type
        raise AlolError(f"{path}: not a trained reward model or classifier ({kind}): its weights lack "
                        f"{', '.join(untrained[:2])}, which would be random")
    model = model.to(args.device).eval()
    model.config.pad_token_id = tok.pad_token_id  # GPT-2 classifiers take the last token before the padding
    if model.config.num_labels > 1 and label is None:  # a reward model, which has one logit, was expected
        raise AlolError(f"{path}: expected a reward model with one logit, got {model.config.num_labels} classes")
    index = None if model.config.num_labels == 1 else label(model.config)
    if index is not None and not 0 <= index < model.config.num_labels:
        raise AlolError(f"{path}: expected a classifier with class {index}, got {model.config.num_labels} classes")
    texts = [t or tok.eos_token for t in texts]  # an empty response is scored as a lone end-of-text token
    pairs = pairs and [t or tok.eos_token for t in pairs]
    out = []
    for i in Stage(range(0, len(texts), args.eval_batch_size), f"reward {os.path.basename(path)}", unit="batch",
                   leave=False):
        enc = tok(texts[i:i + args.eval_batch_size], pairs and pairs[i:i + args.eval_batch_size], return_tensors="pt",
                  padding=True, truncation=True, max_length=min(max_tokens, tok.model_max_length))
        logits = model(**enc.to(args.device)).logits.float()  # (b, classes)
        out.append(torch.sigmoid(logits[:, 0]) if index is None else logits.softmax(-1)[:, index])
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return torch.cat(out).cpu()


class NeoXRewardConfig(transformers.GPTNeoXConfig):
    model_type = "gpt_neox_reward_model"  # what OpenAssistant's reward checkpoints declare in their config.json


class NeoXRewardModel(transformers.GPTNeoXPreTrainedModel):
    """OpenAssistant's reward models (oasst-rm-*-pythia-*, the paper's HH rewards), which no transformers class loads:
    a GPT-NeoX body, then a linear `out_proj` to one logit on the last real token's hidden state (pooling "last") or
    on their mean ("mean"). After register(), AutoModelForSequenceClassification, hence classifier_scores, loads it."""
    config_class = NeoXRewardConfig

    def __init__(self, config):
        super().__init__(config)
        config.num_labels = 1  # one reward logit, whatever label names the checkpoint saved
        self.gpt_neox, self.out_proj = transformers.GPTNeoXModel(config), nn.Linear(config.hidden_size, 1)
        self.post_init()

    def forward(self, input_ids, attention_mask, **kwargs):
        hidden = self.gpt_neox(input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        rows, mask = torch.arange(len(hidden), device=hidden.device), attention_mask[..., None].to(hidden.dtype)
        last = hidden[rows, attention_mask.cumsum(1).argmax(1)]  # (B, H): the last real token, on either padding side
        pooled = last if getattr(self.config, "pooling", "last") == "last" else (hidden * mask).sum(1) / mask.sum(1)
        return transformers.modeling_outputs.SequenceClassifierOutput(logits=self.out_proj(pooled))  # (B, 1)


def register():
    """Let transformers' Auto classes read OpenAssistant's reward checkpoints (called by the tasks that use them)."""
    transformers.AutoConfig.register(NeoXRewardConfig.model_type, NeoXRewardConfig, exist_ok=True)
    transformers.AutoModelForSequenceClassification.register(NeoXRewardConfig, NeoXRewardModel, exist_ok=True)


class CometCritic(nn.Module):
    """The COMET critic of symbolic knowledge distillation (West et al., 2022), as the official code runs it
    (utils/comet_utils.py): RoBERTa's pooler output (the <s> token through dense + tanh), then the official
    RobertaClassificationHead: dense, GELU, out_proj, sigmoid; no dropout, no tanh of its own. Sizes are read from
    the saved head: (1024, 512, 1) for the released critic."""
    HEAD_FILE = "custom_roberta_classification_head.pt"  # beside the RobertaModel folder (official converted layout)

    def __init__(self, roberta, head: dict):
        super().__init__()
        self.roberta = roberta
        self.dense = nn.Linear(*head["dense.weight"].T.shape)
        self.out_proj = nn.Linear(*head["out_proj.weight"].T.shape)
        self.load_state_dict({f"roberta.{k}": v for k, v in roberta.state_dict().items()} | head)  # strict

    def forward(self, input_ids, attention_mask):  # (B, T) -> (B,) P(valid)
        pooled = self.roberta(input_ids=input_ids, attention_mask=attention_mask).pooler_output  # (B, H)
        return torch.sigmoid(self.out_proj(nn.functional.gelu(self.dense(pooled)))).squeeze(-1)


def load_comet_critic(path: str, dtype=torch.float32) -> CometCritic:
    """The critic from the official converted layout (convert_keras_roberta_to_huggingface.py): a RobertaModel folder
    with its pooler, plus CometCritic.HEAD_FILE; every weight must be found, none left over."""
    head_file = os.path.join(path, CometCritic.HEAD_FILE)
    if not os.path.isfile(head_file):
        raise AlolError(f"{path}: no {CometCritic.HEAD_FILE}: not the COMET critic in the official converted layout")
    roberta, info = from_pretrained(transformers.RobertaModel, path, dtype=dtype, output_loading_info=True)
    wrong = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if wrong:
        raise AlolError(f"{path}: the RobertaModel weights do not match its config: {str(wrong)[:200]}")
    head = torch.load(head_file, map_location="cpu", weights_only=True)
    if sorted(head) != ["dense.bias", "dense.weight", "out_proj.bias", "out_proj.weight"]:
        raise AlolError(f"{head_file}: expected the official head's dense and out_proj weights, got {sorted(head)}")
    return CometCritic(roberta, {k: v.to(dtype) for k, v in head.items()}).eval()


@torch.no_grad()
def comet_critic_scores(path: str, pairs: list, args) -> torch.Tensor:
    """P(valid) of each (head, relation + tail) text pair under the COMET critic at `path`, read as RoBERTa's pair
    `<s> A </s></s> B </s>`; loaded for this call and freed after it, fp16 on CUDA (as classifier_scores)."""
    tok = load_tokenizer(path)
    tok.padding_side = "right"
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    critic, out = load_comet_critic(path, dtype).to(args.device), []
    for i in Stage(range(0, len(pairs), args.eval_batch_size), "reward comet critic", unit="batch", leave=False):
        batch = pairs[i:i + args.eval_batch_size]
        enc = tok([a for a, _ in batch], [b for _, b in batch], return_tensors="pt", padding=True, truncation=True,
                  max_length=min(CLASSIFIER_MAX_TOKENS, tok.model_max_length))  # ATOMIC's pairs are far shorter
        out.append(critic(enc["input_ids"].to(args.device), enc["attention_mask"].to(args.device)).float())
    del critic
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return torch.cat(out).cpu() if out else torch.zeros(0)
