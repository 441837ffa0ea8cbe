"""Where a run computes: the device, its precision, CPU threads; and glibc's handling of freed memory, which
the `train` command (the process's owner) opts into, as a library call must not change a process-wide setting."""

from __future__ import annotations

import ctypes
import os

import torch

from catdogcnn.train.config import TrainConfig


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def training_device(config: TrainConfig, world: int) -> torch.device:
    """This process's device, with torch set for it: under torchrun each process takes its own GPU, or its
    share of the CPU cores (processes on one machine share them); on a GPU, cuDNN's deterministic algorithms,
    none chosen by timing, so that seeded runs repeat."""
    device = pick_device(config.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    if config.threads or device.type == "cpu":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(config.threads or max(1, (os.cpu_count() or 1) // local))
    return device


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast where the hardware does bf16 matrix maths: 2x faster training on this project's CPUs."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return device.type == "cpu" and cpu_bf16


def keep_freed_memory() -> None:
    """Have glibc keep freed memory for reuse instead of handing it back to the kernel at once.

    By default a step's large buffers (the seed CNN's 8 MB first activation map) often come back from the
    kernel as fresh pages, faulted in and zeroed again: up to 3,000 page faults per step, and 11-12 s of
    kernel time in a 4-epoch seed-CNN run (1.3 s with this and validation in batches of 64). Freed memory
    stays in the process for reuse. Process-wide, so for the process's owner to call (the `train` and `tune`
    commands do). A no-op where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # glibc's malloc.h
    mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest: blocks below 32 MB come from the reusable heap
    mallopt(m_trim_threshold, 1 << 30)  # give memory back only when 1 GB lies free at the heap's top
    mallopt(m_top_pad, 64 << 20)  # grow the heap 64 MB at a time
