"""Pallas attention kernels: `flash_gpu` (Triton, GPU) and `splash` (TPU splash attention wrapper)."""
