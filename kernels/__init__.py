"""Triton kernels of kcore, installed as ``kcore.kernels``.

One module per op family holds the raw ``@triton.jit`` kernels and their launch wrappers. Import
only when the triton backend is chosen: Triton is optional, and on CPU it runs only under
``TRITON_INTERPRET=1``.
"""
