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
    model = from_pretrained(transformers.AutoModelForSequenceClassification, path, dtype=dtype).to(args.device).eval()
    model.config.pad_token_id = tok.pad_token_id  # GPT-2 classifiers take the last token before the padding
    if model.config.num_labels > 1 and label is None:  # a reward model, which has one logit, was expected
        raise AlolError(f"{path}: expected a reward model with one logit, got {model.config.num_labels} classes")
    index = None if model.config.num_labels == 1 else label(model.config)
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
