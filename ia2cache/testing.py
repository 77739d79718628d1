"""A tiny randomly initialised Llama and a small in-process tokenizer, for fast tests and
benchmarks. Nothing is downloaded; building both takes well under a second."""

from __future__ import annotations

from typing import Any

import torch

_CORPUS = [
    "Input: Output: Review: Label: Word: Antonym: Verb: Past: Sum: Item: Q: A: What is the capital of",
    "The food was great. The service was terrible. hot cold up down big small walk walked go went",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 + - = ? ! . , : ; ' \" \n\n",
    "France Paris Spain Madrid Italy Rome ocean forest river silver paper music yes no",
]


def tiny_tokenizer(vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer trained in-process; no BOS, pads with ``<eos>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.pad_token = "<eos>"
    return fast


def tiny_llama(
    vocab_size: int, hidden: int = 64, layers: int = 4, heads: int = 4, seed: int = 0
) -> Any:
    """A randomly initialised LlamaForCausalLM small enough to run in milliseconds on a CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=1024,
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform logits; a larger scale makes argmax decisions less tied.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    return model.eval()
