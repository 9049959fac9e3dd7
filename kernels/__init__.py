"""Numba kernels for Phi-3 decode: one family per file, each with its NumPy reference and cost formula."""
