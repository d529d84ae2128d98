"""Triton kernels; each file holds the kernel(s), one launcher and a torch reference."""
