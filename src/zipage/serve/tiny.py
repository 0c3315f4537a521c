"""A tiny random-weight checkpoint for smoke tests and the serving benchmark on a CPU.

A 2-layer Llama (hidden size 32) over a byte-level tokenizer: 256 byte tokens plus
``<|endoftext|>`` (EOS), ``<|im_start|>`` and ``<|im_end|>``, with a ChatML chat template. Any
text round-trips through the tokenizer; the model's outputs mean nothing, and its speed is all
the engine's and the server's own work.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    """A byte-level tokenizer with no merges (one token per byte) and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL[0], pad_token=SPECIAL[0])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model(vocab_size: int, seed: int = 0, hidden_size: int = 32, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, eos_token_id=256, pad_token_id=256, bos_token_id=None)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger weights: less flat logits, fewer near-ties for greedy decoding
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(2.0)
    return model


def save_tiny(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny model and its tokenizer into ``folder`` (a checkpoint ``zipage serve`` loads)."""
    folder = Path(folder)
    tokenizer = tiny_tokenizer()
    model = tiny_model(len(tokenizer), seed)
    model.generation_config.eos_token_id = 256
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
