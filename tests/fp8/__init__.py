"""Tests of the fp8 package (CPU reference; CUDA-only checks skip without a GPU)."""
