"""
kcore native core (C++ CPU kernels and, when compiled, CUDA kernels)
"""
from __future__ import annotations
import collections.abc
import numpy
import numpy.typing
import typing
# (data_ptr, dtype code, shape, strides in elements, device: -1 host or the CUDA index),
# as kcore._native.tensor_arg builds it
TensorArg: typing.TypeAlias = tuple[int, int, collections.abc.Sequence[int], collections.abc.Sequence[int], int]
__all__: list[str] = ['FactMatcher', 'Trie', 'TrieBuilder', 'apply_token_bitmask_cpu', 'apply_token_bitmask_keep_finite_cpu', 'build_info', 'cpu_features', 'cuda_compiled', 'echo_tensor_arg', 'elem_types', 'enter_host_openmp_scope', 'exit_host_openmp_scope', 'knn_interpolate', 'knn_search', 'memory_attention_forward', 'merge_attention_states_f32', 'num_threads', 'parallel_backend', 'set_cpu_isa']
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
    @property
    def progress(self) -> typing.Any:
        """
        None or a callable (phase: 0 spill, 1 merge, 2 write; done: count) run now and then during long native work; an exception it raises cancels the build.
        """
    @progress.setter
    def progress(self, arg1: typing.Any) -> None:
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
class FactMatcher:
    """
    Native fact-decoding state per row (see kcore.matcher.FactMatcher).
    """
    def __init__(self, trie: Trie, triggers: collections.abc.Sequence[collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex]], terminator: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], end_tokens: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], stop_tokens: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], avoid_duplicates: bool, max_rollback_tokens: typing.SupportsInt | typing.SupportsIndex, batch_size: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def accept_token(self, row: typing.SupportsInt | typing.SupportsIndex, token: typing.SupportsInt | typing.SupportsIndex, strict: bool = True) -> None:
        ...
    def accept_token_sequence(self, row: typing.SupportsInt | typing.SupportsIndex, tokens: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], strict: bool = True) -> None:
        ...
    def accept_tokens(self, rows: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], tokens: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], strict: bool = True) -> None:
        ...
    def fill_next_token_bitmask(self, bitmask: numpy.ndarray, rows: typing.Annotated[numpy.typing.ArrayLike, numpy.int64] | None = None) -> numpy.typing.NDArray[numpy.bool]:
        ...
    def fill_next_token_bitmask_row(self, bitmask: numpy.ndarray, row: typing.SupportsInt | typing.SupportsIndex, index: typing.SupportsInt | typing.SupportsIndex = 0) -> bool:
        ...
    def fork(self, src_rows: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], dst_rows: typing.Annotated[numpy.typing.ArrayLike, numpy.int64]) -> None:
        ...
    def is_allowed(self, row: typing.SupportsInt | typing.SupportsIndex, token: typing.SupportsInt | typing.SupportsIndex) -> bool:
        ...
    def is_in_fact(self, rows: typing.Annotated[numpy.typing.ArrayLike, numpy.int64] | None = None) -> numpy.typing.NDArray[numpy.bool]:
        ...
    def is_terminated(self, rows: typing.Annotated[numpy.typing.ArrayLike, numpy.int64] | None = None) -> numpy.typing.NDArray[numpy.bool]:
        ...
    def mode(self, row: typing.SupportsInt | typing.SupportsIndex) -> int:
        """
        0 free text, 1 inside a fact, 2 forcing the terminator.
        """
    def open_fact(self, row: typing.SupportsInt | typing.SupportsIndex) -> typing.Any:
        ...
    def position(self, row: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    def prefill(self, row: typing.SupportsInt | typing.SupportsIndex, token_ids: typing.Annotated[numpy.typing.ArrayLike, numpy.int64]) -> None:
        ...
    def reset(self, rows: typing.Annotated[numpy.typing.ArrayLike, numpy.int64] | None = None) -> None:
        ...
    def resize(self, batch_size: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def rollback(self, row: typing.SupportsInt | typing.SupportsIndex, n: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def rollback_available(self, row: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    def same_state(self, a: typing.SupportsInt | typing.SupportsIndex, b: typing.SupportsInt | typing.SupportsIndex) -> bool:
        ...
    def trie_state(self, row: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    def written_facts(self, row: typing.SupportsInt | typing.SupportsIndex) -> list:
        ...
    @property
    def avoid_duplicates(self) -> bool:
        ...
    @property
    def batch_size(self) -> int:
        ...
    @property
    def bitmask_words(self) -> int:
        ...
    @property
    def max_rollback_tokens(self) -> int:
        ...
    @property
    def terminator_ids(self) -> list[int]:
        ...
    @property
    def vocab_size(self) -> int:
        ...
def _choose_cpu_isa(forced: str, cpu_features: collections.abc.Sequence[str]) -> str:
    """
    The variant chosen for a CPU with `cpu_features` (names as in cpu_features()) under KCORE_FORCE_ISA=`forced` ('' = unset); raises ValueError as the import would. For tests of the selection rule.
    """
def apply_token_bitmask_cpu(logits: TensorArg, bitmask: TensorArg, indices: TensorArg | None = None) -> None:
    """
    Set logits ((rows, vocab) float32/float16/bfloat16, host) to -inf in place where the int32 bitmask bit is 0. indices (int64 (num_indices,) or None) selects rows. Tensors as kcore._native.tensor_arg.
    """
def apply_token_bitmask_keep_finite_cpu(logits: TensorArg, bitmask: TensorArg, indices: TensorArg | None = None) -> None:
    """
    Mask host logits in place with the bitmask (rows listed in indices, or all), then give a listed row whose allowed tokens were all -inf score 0 on them (see csrc/core/fact_matcher.h).
    """
def build_info() -> dict:
    """
    How this extension was built: compiler, build_type, core_flags (of the code outside the kernel variants), cuda_architectures.
    """
def cpu_features() -> dict:
    """
    The CPU kernel variant in use and why: dict with isa ('baseline' | 'avx2' | 'avx512' | 'native' | 'generic'), chosen_by ('cpuid' | 'KCORE_FORCE_ISA' | 'set_cpu_isa'), variants (compiled, slowest first), supported (those this CPU runs), variant_flags (compiler flags of each), runtime_extensions (extensions the variant in use picks at run time, e.g. 'avx512bf16'), cpu_vendor, cpu_brand, cpu_features (as GCC's -m options name them).
    """
def echo_tensor_arg(t: TensorArg) -> TensorArg:
    """
    The descriptor as the bindings see it (tests of the boundary contract).
    """
def enter_host_openmp_scope() -> None:
    """
    Until the matching exit, this thread's CPU kernels run on the host's OpenMP team when one is loaded (unless KCORE_HOST_OPENMP=0). Scopes nest.
    """
def exit_host_openmp_scope() -> None:
    """
    Close one enter_host_openmp_scope().
    """
def knn_interpolate(logits: TensorArg, dists: TensorArg, values: TensorArg, lmbda: typing.SupportsFloat | typing.SupportsIndex, temperature: typing.SupportsFloat | typing.SupportsIndex, metric: typing.SupportsInt | typing.SupportsIndex, out: TensorArg) -> None:
    """
    Fused kNN-LM interpolation (see csrc/core/knn.h): logits (batch, vocab) float, dists (batch, k) float32, values (batch, k) int32/int64; writes float32 log-probabilities (batch, vocab) to out.
    """
def knn_search(queries: TensorArg, keys: TensorArg, k: typing.SupportsInt | typing.SupportsIndex, metric: typing.SupportsInt | typing.SupportsIndex, out_dists: TensorArg, out_ids: TensorArg) -> None:
    """
    Exact kNN search (see csrc/core/knn.h): queries (num_queries, dim) float32 contiguous, keys (num_keys, dim) float, rows contiguous; writes out_dists float32 and out_ids int64 (num_queries, k). Metric 0 = l2, 1 = ip.
    """
def memory_attention_forward(query: TensorArg, mem_keys_normed: TensorArg, mem_keys: TensorArg, mem_values: TensorArg, mem_key_scales: TensorArg | None, mem_value_scales: TensorArg | None, topk: typing.SupportsInt | typing.SupportsIndex, scale: typing.SupportsFloat | typing.SupportsIndex, similarity_threshold: typing.SupportsFloat | typing.SupportsIndex | None, out: TensorArg, lse: TensorArg, indices: TensorArg) -> None:
    """
    Top-k memory attention on CPU: query (num_kv_heads, queries_per_head, head_dim) float32 contiguous; memory tensors (num_kv_heads, mem_len, head_dim), last dim contiguous (keys/values may be int8 with (num_kv_heads, mem_len) float32 row scales, else None); writes out (num_kv_heads, queries_per_head, head_dim) float32, lse (num_kv_heads, queries_per_head) float32, indices (num_kv_heads, queries_per_head, topk) int64. Releases the GIL.
    """
def merge_attention_states_f32(out_a: TensorArg, lse_a: TensorArg, out_b: TensorArg, lse_b: TensorArg, out: TensorArg, lse: TensorArg) -> int:
    """
    Merge two attention states, float32 contiguous host tensors: out_* (*batch_dims, head_dim), lse_* (*batch_dims). Returns 0, or 1 / 2 when lse_a / lse_b holds NaN or +inf (nothing written).
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
elem_types: dict = {'float32': 0, 'float16': 1, 'bfloat16': 2, 'int8': 3, 'int32': 4, 'int64': 5, 'uint8': 6, 'bool': 7}
def apply_token_bitmask_cuda(logits: TensorArg, bitmask: TensorArg, indices: TensorArg | None, stream: typing.SupportsInt | typing.SupportsIndex) -> None:
    """
    CUDA version of apply_token_bitmask_cpu: device tensors, launched on `stream` (cudaStream_t as int). Only in builds with the CUDA kernels (cuda_compiled).
    """
