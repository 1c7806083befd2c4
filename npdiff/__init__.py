"""npdiff: a text-to-image diffusion engine written from scratch in NumPy and Numba."""

__version__ = "0.1.0"
