"""
kcore native core (C++ CPU kernels and, when compiled, CUDA kernels)
"""
from __future__ import annotations
import collections.abc
import numpy
import numpy.typing
import typing
__all__: list[str] = ['Trie', 'TrieBuilder', 'apply_token_bitmask_cpu', 'build_info', 'cpu_features', 'cuda_compiled', 'enter_host_openmp_scope', 'exit_host_openmp_scope', 'fact_step', 'knn_interpolate', 'knn_search', 'memory_attention_forward', 'merge_attention_states_f32', 'num_threads', 'parallel_backend', 'set_cpu_isa']
class TrieBuilder:
    """
    Sort-based external-memory builder of a .ktrie file (see kcore.trie).
    """
    def __init__(self, vocab_size: typing.SupportsInt | typing.SupportsIndex, memory_budget_bytes: typing.SupportsInt | typing.SupportsIndex, tmp_dir: str) -> None:
        ...
    def add(self, tokens: numpy.ndarray, offsets: typing.Annotated[numpy.typing.ArrayLike, numpy.int64]) -> None:
        """
        Add sequences tokens[offsets[i]:offsets[i+1]] (tokens int32 or int64, offsets int64).
        """
    def finish(self, path: str, tokenizer_fingerprint: str) -> dict:
        ...
    @property
    def num_added(self) -> int:
        ...
class Trie:
    """
    A memory-mapped .ktrie file (see kcore.trie.FactTrie).
    """
    def __init__(self, path: str, verify_data: bool) -> None:
        ...
    def fact_range(self, states: typing.Annotated[numpy.typing.ArrayLike, numpy.int64]) -> tuple[numpy.typing.NDArray[numpy.int64], numpy.typing.NDArray[numpy.int64]]:
        ...
    def fill_bitmask(self, states: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], bitmask: typing.Any, rows: typing.SupportsInt | typing.SupportsIndex, words_per_row: typing.SupportsInt | typing.SupportsIndex, written_offsets: typing.Annotated[numpy.typing.ArrayLike, numpy.int64] | None = None, written_ids: typing.Annotated[numpy.typing.ArrayLike, numpy.int64] | None = None) -> None:
        ...
    def is_complete(self, states: typing.Annotated[numpy.typing.ArrayLike, numpy.int64]) -> numpy.typing.NDArray[numpy.bool]:
        ...
    def next_tokens(self, state: typing.SupportsInt | typing.SupportsIndex) -> numpy.typing.NDArray[numpy.int32]:
        ...
    def step(self, states: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], tokens: typing.Annotated[numpy.typing.ArrayLike, numpy.int64]) -> numpy.typing.NDArray[numpy.int64]:
        ...
    def verify_data(self) -> None:
        ...
    def walk(self, tokens: typing.Annotated[numpy.typing.ArrayLike, numpy.int64]) -> int:
        """
        State reached from the root by the tokens (-1 if none).
        """
    @property
    def file_bytes(self) -> int:
        ...
    @property
    def fingerprint(self) -> str:
        ...
    @property
    def num_edges(self) -> int:
        ...
    @property
    def num_facts(self) -> int:
        ...
    @property
    def num_nodes(self) -> int:
        ...
    @property
    def num_trie_nodes(self) -> int:
        ...
    @property
    def path(self) -> str:
        ...
    @property
    def root_state(self) -> int:
        ...
    @property
    def vocab_size(self) -> int:
        ...
def _choose_cpu_isa(forced: str, cpu_features: collections.abc.Sequence[str]) -> str:
    """
    The variant chosen for a CPU with `cpu_features` (names as in cpu_features()) under KCORE_FORCE_ISA=`forced` ('' = unset); raises ValueError as the import would. For tests of the selection rule.
    """
def apply_token_bitmask_cpu(logits: typing.SupportsInt | typing.SupportsIndex, dtype: typing.SupportsInt | typing.SupportsIndex, rows: typing.SupportsInt | typing.SupportsIndex, vocab: typing.SupportsInt | typing.SupportsIndex, logits_row_stride: typing.SupportsInt | typing.SupportsIndex, bitmask: typing.SupportsInt | typing.SupportsIndex, bitmask_rows: typing.SupportsInt | typing.SupportsIndex, bitmask_words: typing.SupportsInt | typing.SupportsIndex, bitmask_row_stride: typing.SupportsInt | typing.SupportsIndex, indices: typing.SupportsInt | typing.SupportsIndex, num_indices: typing.SupportsInt | typing.SupportsIndex) -> None:
    """
    Set logits (host pointer, (rows, vocab), dtype code 0=fp32 1=fp16 2=bf16) to -inf in place where the int32 bitmask bit is 0. indices (int64 host pointer or 0) selects rows. Strides are in elements.
    """
def build_info() -> dict:
    """
    How this extension was built: compiler, build_type, baseline_flags, cuda_architectures.
    """
def cpu_features() -> dict:
    """
    The CPU kernel variant in use and why: dict with isa ('baseline' | 'avx2' | 'avx512' | 'native' | 'generic'), chosen_by ('cpuid' | 'KCORE_FORCE_ISA' | 'set_cpu_variant'), variants (compiled, slowest first), supported (those this CPU runs), variant_flags (compiler flags of each), runtime_extensions (extensions the variant in use picks at run time, e.g. 'avx512bf16'), cpu_vendor, cpu_brand, cpu_features (as GCC's -m options name them).
    """
def enter_host_openmp_scope() -> None:
    """
    Until the matching exit, this thread's CPU kernels run on the host's OpenMP team when one is loaded (unless KCORE_HOST_OPENMP=0). Scopes nest.
    """
def exit_host_openmp_scope() -> None:
    """
    Close one enter_host_openmp_scope().
    """
def fact_step(trie: Trie, rows: typing.SupportsInt | typing.SupportsIndex, mode: numpy.ndarray, state: numpy.ndarray, step_token: numpy.ndarray, written_offsets: numpy.ndarray | None, written_ids: numpy.ndarray | None, avoid_duplicates: bool, terminator: numpy.ndarray, bitmask: numpy.ndarray, first: numpy.ndarray, flags: numpy.ndarray, constrained: numpy.ndarray, logits: typing.SupportsInt | typing.SupportsIndex, dtype: typing.SupportsInt | typing.SupportsIndex, vocab: typing.SupportsInt | typing.SupportsIndex, logits_row_stride: typing.SupportsInt | typing.SupportsIndex) -> int:
    """
    One fact-constrained decoding step for every row (see csrc/core/fact_step.h): advances states, fills the bitmask, sets terminator bits and, when logits (host pointer, (rows, vocab), dtype code 0=fp32 1=fp16 2=bf16, row stride in elements) is not 0, masks them in place. Returns the number of constrained rows.
    """
def knn_interpolate(logits: typing.SupportsInt | typing.SupportsIndex, logits_dtype: typing.SupportsInt | typing.SupportsIndex, batch: typing.SupportsInt | typing.SupportsIndex, vocab: typing.SupportsInt | typing.SupportsIndex, logits_stride: typing.SupportsInt | typing.SupportsIndex, dists: typing.SupportsInt | typing.SupportsIndex, values: typing.SupportsInt | typing.SupportsIndex, values_int64: bool, k: typing.SupportsInt | typing.SupportsIndex, lmbda: typing.SupportsFloat | typing.SupportsIndex, temperature: typing.SupportsFloat | typing.SupportsIndex, metric: typing.SupportsInt | typing.SupportsIndex, out: typing.SupportsInt | typing.SupportsIndex) -> None:
    """
    Fused kNN-LM interpolation (see csrc/core/knn.h); writes fp32 log-probabilities to out.
    """
def knn_search(queries: typing.SupportsInt | typing.SupportsIndex, num_queries: typing.SupportsInt | typing.SupportsIndex, dim: typing.SupportsInt | typing.SupportsIndex, keys: typing.SupportsInt | typing.SupportsIndex, key_dtype: typing.SupportsInt | typing.SupportsIndex, num_keys: typing.SupportsInt | typing.SupportsIndex, key_stride: typing.SupportsInt | typing.SupportsIndex, k: typing.SupportsInt | typing.SupportsIndex, metric: typing.SupportsInt | typing.SupportsIndex, out_dists: typing.SupportsInt | typing.SupportsIndex, out_ids: typing.SupportsInt | typing.SupportsIndex) -> None:
    """
    Exact kNN search (see csrc/core/knn.h); pointers are data_ptr() values, queries fp32 contiguous.
    """
def memory_attention_forward(query: typing.SupportsInt | typing.SupportsIndex, num_kv_heads: typing.SupportsInt | typing.SupportsIndex, queries_per_head: typing.SupportsInt | typing.SupportsIndex, head_dim: typing.SupportsInt | typing.SupportsIndex, mem_len: typing.SupportsInt | typing.SupportsIndex, normed_dtype: typing.SupportsInt | typing.SupportsIndex, kv_dtype: typing.SupportsInt | typing.SupportsIndex, keys_normed: typing.SupportsInt | typing.SupportsIndex, kn_stride_head: typing.SupportsInt | typing.SupportsIndex, kn_stride_row: typing.SupportsInt | typing.SupportsIndex, keys: typing.SupportsInt | typing.SupportsIndex, k_stride_head: typing.SupportsInt | typing.SupportsIndex, k_stride_row: typing.SupportsInt | typing.SupportsIndex, values: typing.SupportsInt | typing.SupportsIndex, v_stride_head: typing.SupportsInt | typing.SupportsIndex, v_stride_row: typing.SupportsInt | typing.SupportsIndex, key_scales: typing.SupportsInt | typing.SupportsIndex, value_scales: typing.SupportsInt | typing.SupportsIndex, topk: typing.SupportsInt | typing.SupportsIndex, scale: typing.SupportsFloat | typing.SupportsIndex, similarity_threshold: typing.SupportsFloat | typing.SupportsIndex | None, out: typing.SupportsInt | typing.SupportsIndex, lse: typing.SupportsInt | typing.SupportsIndex, indices: typing.SupportsInt | typing.SupportsIndex) -> None:
    """
    Top-k memory attention on CPU over raw pointers: query (num_kv_heads, queries_per_head, head_dim) float32 contiguous; memory tensors (num_kv_heads, mem_len, head_dim), last dim contiguous (keys/values may be int8 with (num_kv_heads, mem_len) float32 row scales, else 0 pointers); writes out (num_kv_heads, queries_per_head, head_dim) f32, lse (num_kv_heads, queries_per_head) f32, indices (num_kv_heads, queries_per_head, topk) int64. Releases the GIL.
    """
def merge_attention_states_f32(out_a: typing.SupportsInt | typing.SupportsIndex, lse_a: typing.SupportsInt | typing.SupportsIndex, out_b: typing.SupportsInt | typing.SupportsIndex, lse_b: typing.SupportsInt | typing.SupportsIndex, rows: typing.SupportsInt | typing.SupportsIndex, head_dim: typing.SupportsInt | typing.SupportsIndex, out: typing.SupportsInt | typing.SupportsIndex, lse: typing.SupportsInt | typing.SupportsIndex) -> int:
    """
    Merge two attention states over raw float32 contiguous pointers: out_* (rows, head_dim), lse_* (rows). Returns 0, or 1 / 2 when lse_a / lse_b holds NaN or +inf (nothing written).
    """
def num_threads() -> int:
    """
    Threads the CPU kernels may use ($KCORE_NUM_THREADS or the core count).
    """
def parallel_backend() -> str:
    """
    What the calling thread's CPU kernels would run on now: 'host-openmp' (the process's OpenMP team, e.g. PyTorch's) or 'kcore-pool'.
    """
def set_cpu_isa(isa: str) -> None:
    """
    Run every later CPU kernel call on variant `isa` (one of cpu_features()['supported']), for benchmarks and tests that compare the variants in one process; KCORE_FORCE_ISA does the same at import. Raises ValueError for a variant this build lacks or this CPU cannot run.
    """
cuda_compiled: bool = False
def apply_token_bitmask_cuda(logits: typing.SupportsInt | typing.SupportsIndex, dtype: typing.SupportsInt | typing.SupportsIndex, rows: typing.SupportsInt | typing.SupportsIndex, vocab: typing.SupportsInt | typing.SupportsIndex, logits_row_stride: typing.SupportsInt | typing.SupportsIndex, bitmask: typing.SupportsInt | typing.SupportsIndex, bitmask_rows: typing.SupportsInt | typing.SupportsIndex, bitmask_words: typing.SupportsInt | typing.SupportsIndex, bitmask_row_stride: typing.SupportsInt | typing.SupportsIndex, indices: typing.SupportsInt | typing.SupportsIndex, num_indices: typing.SupportsInt | typing.SupportsIndex, stream: typing.SupportsInt | typing.SupportsIndex) -> None:
    """
    CUDA version of apply_token_bitmask_cpu: device pointers, launched on `stream` (cudaStream_t as int). Only in builds with the CUDA kernels (cuda_compiled).
    """
