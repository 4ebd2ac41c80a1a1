"""Triton kernels. Each has a torch reference beside it, which is what runs where Triton cannot (CPU, compile)."""
