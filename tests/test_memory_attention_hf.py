import math
import sys

import pytest
import torch
from membank_util import DOCS, tiny_model, tiny_tokenizer

from kcore.attention import MemoryBank
from kcore.errors import InvalidInputError
from kcore.hf import enable_memory_attention
from kcore.ops import context_attention

PROMPTS = ["what is the capital of zorbia", "cats sit on", "hello world memory document about the old city"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(len(tok.get_vocab()))


@pytest.fixture(scope="module")
def bank(model, tok):
    return MemoryBank.build(model, tok, DOCS, window=12, stride=4, dtype=torch.float32, progress=False)


class ReferenceMemoryAttention:
    """The anchor's semantics written out independently: per query head, top-k memory keys by
    cosine similarity; their logits q.k*scale concatenated with the masked context logits; one
    softmax. Registered with transformers under its own name. Also keeps, per layer, the joint
    probabilities of the memory tokens at the last query position."""

    def __init__(self, bank, topk, layers):
        self.bank, self.topk, self.layers = bank, topk, set(layers)
        self.memory_probs = {}

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kw):
        b, hq, q_len, d = query.shape
        hkv, kv_len = key.shape[1], key.shape[2]
        g = hq // hkv
        q = query.double()
        kk = key.double().repeat_interleave(g, dim=1)
        vv = value.double().repeat_interleave(g, dim=1)
        ctx = q @ kk.transpose(-1, -2) * scaling
        if attention_mask is None:
            allowed = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
        else:
            allowed = attention_mask[..., :kv_len]
        ctx = ctx.masked_fill(~allowed, -math.inf)
        layer = module.layer_idx
        out = torch.empty(b, hq, q_len, d, dtype=torch.float64)
        probs = torch.zeros(b, hq, self.bank.mem_len, dtype=torch.float64)
        for h in range(hq):
            logits, vals = ctx[:, h], vv[:, h]
            if layer in self.layers and self.bank.mem_len:
                mk = self.bank.keys(layer)[h // g].double()
                mv = self.bank.values(layer)[h // g].double()
                sims = q[:, h] @ (mk / mk.norm(dim=-1, keepdim=True)).T  # (b, q_len, mem_len)
                idx = sims.topk(min(self.topk, self.bank.mem_len), dim=-1).indices
                mem_logits = (q[:, h].unsqueeze(-2) * mk[idx]).sum(-1) * scaling
                p = torch.softmax(torch.cat([logits, mem_logits], dim=-1), dim=-1)
                p = torch.nan_to_num(p)
                out[:, h] = p[..., :kv_len] @ vals + (p[..., kv_len:].unsqueeze(-1) * mv[idx]).sum(-2)
                probs[:, h].scatter_add_(1, idx[:, -1], p[:, -1, kv_len:])
            else:
                p = torch.nan_to_num(torch.softmax(logits, dim=-1))
                out[:, h] = p @ vals
        self.memory_probs[layer] = probs.mean(dim=1)  # (b, mem_len)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None


def reference_logits(model, ref, **inputs):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("test_reference_memory", ref)
    AttentionMaskInterface.register("test_reference_memory", sdpa_mask)
    prev = model.config._attn_implementation
    model.set_attn_implementation("test_reference_memory")
    try:
        with torch.no_grad():
            return model(**inputs).logits
    finally:
        model.set_attn_implementation(prev)


def padded(tok, prompts):
    """Left-padded batch with position ids counted from each row's first real token, as
    generate() does: memory keys are not rotated, so memory logits depend on the query's
    absolute position and a padded row must keep its unpadded positions."""
    inputs = tok(prompts, return_tensors="pt", padding=True)
    inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    return inputs


def generate(model, inputs, **kw):
    return model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **kw)


def test_empty_bank_equals_the_plain_model(model, tok):
    inputs = padded(tok, PROMPTS)
    with torch.no_grad():
        plain = model(**inputs).logits
        plain_gen = generate(model, inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        with enable_memory_attention(model, MemoryBank.empty(model, dtype=torch.float32), topk=4):
            hooked = model(**inputs).logits
            hooked_gen = generate(model, inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(hooked[valid], plain[valid], atol=1e-5, rtol=1e-5)
    assert torch.equal(hooked_gen, plain_gen)


@pytest.mark.parametrize("layers,topk", [([1], 3), ([0, 1], 5), ([0, 1], 1000)])
def test_hooked_forward_equals_reference_concatenated_softmax(model, tok, bank, layers, topk):
    inputs = padded(tok, PROMPTS)
    ref = ReferenceMemoryAttention(bank, topk, layers)
    want = reference_logits(model, ref, **inputs)
    with torch.no_grad(), enable_memory_attention(model, bank, topk=topk, layers=layers) as handle:
        got = model(**inputs).logits
        cites = handle.citations(top=3)
        cites_no_sink = handle.citations(top=3, skip_leading=1)
    # The weights are computed when citations() is called: the same after the handle is disabled.
    assert handle.citations(top=3) == cites
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-4, rtol=1e-4)
    # The memory actually changes the output (else this test could not fail).
    with torch.no_grad():
        plain = model(**inputs).logits
    assert (plain[valid] - want[valid]).abs().max() > 1e-2
    # Citations of the one step: the most attended memory tokens with their joint probability.
    mean_probs = sum(ref.memory_probs[l] for l in layers) / len(layers)
    for row in range(len(PROMPTS)):
        (step,) = cites[row]
        top = mean_probs[row].topk(3)
        assert [c.index for c in step] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor([c.weight for c in step], dtype=torch.float64), top.values, atol=1e-5, rtol=1e-4)
        for c in step:
            assert c.text == bank.documents[c.document][c.start : c.end] == bank.text(c.index)
        # Leaving out each document's first token (the memory's attention sinks).
        starts = [0, len(DOCS[0].split())]
        probs = mean_probs[row].clone()
        probs[starts] = 0
        (step,) = cites_no_sink[row]
        assert [c.index for c in step] == probs.topk(3).indices.tolist()


def test_left_padded_batch_equals_single_rows(model, tok, bank):
    inputs = padded(tok, PROMPTS)
    with torch.no_grad(), enable_memory_attention(model, bank, topk=4) as handle:
        batch_logits = model(**inputs).logits[:, -1]
        batch_gen = generate(model, inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        batch_cites = handle.citations()
        for row, prompt in enumerate(PROMPTS):
            single = tok([prompt], return_tensors="pt")
            torch.testing.assert_close(model(**single).logits[0, -1], batch_logits[row], atol=1e-4, rtol=1e-4)
            gen = model.generate(**single, max_new_tokens=5, min_new_tokens=5, do_sample=False)
            n = single["input_ids"].shape[1]
            assert gen[0, n:].tolist() == batch_gen[row, -5:].tolist()
            single_cites = handle.citations()[0]
            assert len(single_cites) == 5
            assert [[c.index for c in s] for s in single_cites] == [[c.index for c in s] for s in batch_cites[row]]


def test_sampling_is_reproducible_and_uses_memory(model, tok, bank):
    inputs = padded(tok, PROMPTS[:2])
    with torch.no_grad(), enable_memory_attention(model, bank, topk=4) as handle:
        torch.manual_seed(5)
        a = generate(model, inputs, max_new_tokens=6, min_new_tokens=6, do_sample=True, top_k=0, temperature=1.0)
        torch.manual_seed(5)
        b = generate(model, inputs, max_new_tokens=6, min_new_tokens=6, do_sample=True, top_k=0, temperature=1.0)
        assert len(handle.citations()[1]) == 6
    assert torch.equal(a, b)


def test_disable_restores_the_model(model, tok, bank):
    inputs = padded(tok, PROMPTS)
    with torch.no_grad():
        plain = model(**inputs).logits
        handle = enable_memory_attention(model, bank, topk=4)
        assert model.config._attn_implementation == handle.name
        assert not torch.allclose(model(**inputs).logits, plain)
        handle.disable()
        assert model.config._attn_implementation == "sdpa"
        assert torch.equal(model(**inputs).logits, plain)
    from transformers import AttentionInterface

    assert handle.name not in AttentionInterface._global_mapping


def test_context_attention_matches_softmax_with_lse():
    torch.manual_seed(1)
    q = torch.randn(2, 6, 3, 8)
    k, v = torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    mask = torch.rand(2, 1, 3, 7) > 0.3
    mask[1, 0, 2] = False  # a row that sees nothing: zeros and -inf, never NaN
    out, lse = context_attention(q, k, v, mask, 0.4)
    logits = (q @ k.repeat_interleave(3, 1).transpose(-1, -2) * 0.4).masked_fill(~mask, -math.inf)
    want_lse = torch.logsumexp(logits, -1)
    want = torch.nan_to_num(torch.softmax(logits, -1)) @ v.repeat_interleave(3, 1)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    assert torch.isneginf(lse[1, :, 2]).all() and (out[1, :, 2] == 0).all()
    # No mask and q_len > 1: causal aligned top-left, as SDPA's is_causal (transformers passes no
    # mask with q_len < kv_len only for a prefill into an empty static cache).
    out, lse = context_attention(q, k, v, None, 0.4)
    causal = torch.ones(3, 7, dtype=torch.bool).tril(0)
    logits = (q @ k.repeat_interleave(3, 1).transpose(-1, -2) * 0.4).masked_fill(~causal, -math.inf)
    torch.testing.assert_close(out, torch.softmax(logits, -1) @ v.repeat_interleave(3, 1), atol=1e-5, rtol=1e-5)


def test_bad_arguments(model, bank):
    with pytest.raises(InvalidInputError, match="topk"):
        enable_memory_attention(model, bank, topk=0)
    with pytest.raises(InvalidInputError, match="rope"):
        enable_memory_attention(model, bank, rope="alibi")
    with pytest.raises(InvalidInputError, match="layers"):
        enable_memory_attention(model, bank, layers=[7])
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.slow
def test_smollm2_memory_generate_with_citations(smollm2):
    model, tok = smollm2
    doc = "Zorbia is a small invented country. The capital of Zorbia is Quenthaville, a port city."
    bank = MemoryBank.build(model, tok, [doc], window=64, stride=32, progress=False)
    msgs = [{"role": "user", "content": "What is the capital of Zorbia?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        plain = model.generate(**ids, max_new_tokens=8, do_sample=False)
        with enable_memory_attention(model, MemoryBank.empty(model), topk=8):
            empty = model.generate(**ids, max_new_tokens=8, do_sample=False)
        with enable_memory_attention(model, bank, topk=8) as handle:
            out = model.generate(**ids, max_new_tokens=12, do_sample=False)
            cites = handle.citations(top=2)
    assert torch.equal(empty, plain)
    n = ids["input_ids"].shape[1]
    assert len(cites[0]) == out.shape[1] - n
    assert all(c.document == 0 and c.text == doc[c.start : c.end] for step in cites[0] for c in step)
    assert "Quenth" in tok.decode(out[0, n:])


def test_int8_bank_stays_int8_and_equals_its_dequantised_copy(model, tok):
    q8 = MemoryBank.build(model, tok, DOCS, window=12, stride=4, dtype=torch.float32, quantization="int8", progress=False)
    # The same memory as plain float32 tensors (int8 row * scale), through the float path.
    deq = MemoryBank(
        keys={l: q8.keys(l) for l in q8.layers}, values={l: q8.values(l) for l in q8.layers},
        token_map=q8.token_map, documents=q8.documents, num_kv_heads=q8.num_kv_heads, head_dim=q8.head_dim,
        dtype=torch.float32,
    )
    inputs = padded(tok, PROMPTS)
    with torch.no_grad():
        with enable_memory_attention(model, deq, topk=4) as h:
            want = model(**inputs).logits
            want_cites = h.citations(top=3)
        with enable_memory_attention(model, q8, topk=4) as h:
            got = model(**inputs).logits
            got_cites = h.citations(top=3)
            # What the hook holds for the op: the stored int8 tensors, not a dequantised copy.
            k, v, _, ks, vs = h._memory(0, torch.device("cpu"))
            assert k.dtype == v.dtype == torch.int8 and ks.dtype == torch.float32
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=1e-5)
    assert [[c.index for c in s] for r in got_cites for s in r] == [[c.index for c in s] for r in want_cites for s in r]
    with pytest.raises(InvalidInputError, match="int8"):
        deq.quantized(0)


def test_hook_runs_the_kernels_on_the_host_openmp_team(model, tok, bank, monkeypatch):
    # Inside the model's forward pass torch's OpenMP workers are started and spinning: the hook
    # opens a host-OpenMP scope so kcore's kernels run on them instead of competing for the cores.
    ops = sys.modules["kcore.ops.memory_attention"]
    from kcore._native import native

    seen = []
    real = ops.memory_attention

    def spy(*args, **kwargs):
        seen.append(native().parallel_backend())
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "memory_attention", spy)
    with open("/proc/self/maps") as f:
        loaded = any(n.rsplit("/", 1)[-1].startswith(("libgomp", "libiomp5", "libomp.")) for n in (l.split()[-1] for l in f))
    with torch.no_grad(), enable_memory_attention(model, bank, topk=4):
        model(**padded(tok, PROMPTS))
    assert seen and set(seen) == {"host-openmp" if loaded else "kcore-pool"}
    assert native().parallel_backend() == "kcore-pool"  # the scope ends with the call


def test_one_handle_at_a_time_and_bad_backend_refused_up_front(model, tok, bank):
    h1 = enable_memory_attention(model, bank, topk=4)
    try:
        with pytest.raises(InvalidInputError, match="already enabled"):
            enable_memory_attention(model, bank, topk=8)
    finally:
        h1.disable()
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(InvalidInputError, match="backend"):
        enable_memory_attention(model, bank, backend="bogus")
    assert model.config._attn_implementation == "sdpa"
    enable_memory_attention(model, bank, topk=4).disable()  # usable again


def test_citations_follow_each_generate_with_a_static_cache(model, tok, bank):
    inputs = tok(["what is the capital of zorbia"], return_tensors="pt")
    with torch.no_grad(), enable_memory_attention(model, bank, topk=4) as h:
        for n in (4, 6):
            out = generate(model, inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation="static")
            assert out.shape[1] - inputs["input_ids"].shape[1] == n
            assert len(h.citations()[0]) == n  # step i = generated token i, not the previous call's steps
            # The static cache's unwritten slots are never attended: same tokens as a dynamic cache.
            dyn = generate(model, inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            assert torch.equal(out, dyn)


def test_empty_bank_citations_have_one_empty_list_per_row_and_step(model, tok):
    inputs = padded(tok, PROMPTS[:2])
    with torch.no_grad(), enable_memory_attention(model, MemoryBank.empty(model, dtype=torch.float32), topk=4) as h:
        generate(model, inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert h.citations() == [[[], [], []], [[], [], []]]


@pytest.mark.slow
def test_cli_memory_generate_takes_the_prompt_after_memory_files(tmp_path, capsys):
    # `--memory FILE...` takes several files; the prompt written after them must not be swallowed.
    from kcore.cli import main

    doc = tmp_path / "zorbia.txt"
    doc.write_text("The capital of Zorbia is Quenthaville.")
    assert main(["memory-generate", "--memory", str(doc), "What is the capital of Zorbia?", "--max-new-tokens", "6", "--window", "64", "--stride", "32"]) == 0
    assert "Quenth" in capsys.readouterr().out
