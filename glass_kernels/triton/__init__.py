"""Triton kernels of glass_kernels (issue 3): one op per file, same semantics as reference.py.

Importing this package imports triton; ops.py imports it lazily and only for the "triton"
backend or CUDA tensors. For CPU tensors (tests) set TRITON_INTERPRET=1 before triton is first
imported. Inputs are expected to be validated by glass_kernels.ops.
"""

from glass_kernels.triton.neuron_stats import neuron_stats_
from glass_kernels.triton.select_neurons import select_neurons
from glass_kernels.triton.sparse_ffn import sparse_ffn, sparse_ffn_q, sparse_mlp, sparse_mlp_q

__all__ = ["sparse_ffn", "sparse_mlp", "sparse_ffn_q", "sparse_mlp_q", "neuron_stats_", "select_neurons"]
