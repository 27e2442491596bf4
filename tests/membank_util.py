"""Shared helpers of the memory bank / memory attention tests: a tiny fast tokenizer and a tiny
random Llama model, so the tests run in seconds without the real model."""

import torch

WORDS = (
    "the capital of zorbia is quenth and of mirland is pavo . cats sit on mats while dogs run in parks "
    "what where who a an to hello world memory document about river mountain city old new red blue"
).split()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]")
    tok.padding_side = "left"
    return tok


def tiny_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )
    model = LlamaForCausalLM(cfg).eval()
    # Random init gives near-uniform attention; larger q/k weights make the softmax (and so any
    # error in masking, selection or merging) visible in the logits.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return model


DOCS = [
    "the capital of zorbia is quenth . cats sit on mats while dogs run in parks . " * 3,
    "hello world memory document about river mountain city old new red blue",
]
