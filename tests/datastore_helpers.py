"""Shared fixtures of the datastore / kNN-LM / MLP Memory tests: a tiny random Llama and a word-level
tokenizer over a small synthetic corpus, both built in memory in well under a second."""

from __future__ import annotations

import random

import torch

WORDS = (
    "the a cat dog bird sat ran flew on under over mat log tree and then it was red blue big small "
    "fire wind rain city town river north south east west today yesterday people police said"
).split()


def corpus(num_docs: int = 12, seed: int = 0):
    """Documents of 5-60 words with repeated patterns (so neighbours carry signal)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        n = rng.randint(5, 60)
        words = []
        while len(words) < n:
            if rng.random() < 0.5:
                words += ["the", rng.choice(["cat", "dog", "bird"]), "sat", "on", "the", "mat"]
            else:
                words.append(rng.choice(WORDS))
        docs.append(" ".join(words[:n]))
    return docs


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<eos>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=1, eos_token_id=2, bos_token_id=None, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    return model
