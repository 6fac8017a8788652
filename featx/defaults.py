"""The rules behind options left unset or ``auto``: one small function each.

A rule's docstring is its one-line description, and `featx --help` shows it as the option's
default, so the help cannot drift from the code that applies it (``runtime.device.feed``,
``HeadConfig``). No torch here: the CLI imports this module to print its help.
"""

from __future__ import annotations

import os

CUDA_BATCH = 256  # timm's benchmark and clip-retrieval use 256 on a GPU
CPU_BATCH = 32  # on a CPU a bigger batch is no faster, only bigger
MAX_CUDA_WORKERS = 16  # libjpeg-turbo at ~1,500 img/s a core: 16 workers feed ~20k img/s
MAX_CPU_WORKERS = 8  # the model needs the other cores


def describe(rule: object) -> str:
    """The first line of ``rule``'s docstring: what the help shows as its default."""
    return (getattr(rule, "__doc__", None) or "").strip().splitlines()[0].rstrip(".")


def batch_size_for(device_type: str) -> int:
    """256 on CUDA, else 32."""
    return CUDA_BATCH if device_type == "cuda" else CPU_BATCH


CPU_SHARD = 256  # about a minute of ResNet-50 on a slow 2-core CPU (4-9 img/s)
CUDA_SHARD = 16_384  # 1.3 s of ResNet-50 fp16 at 12k img/s (an H100's eager ceiling)


def shard_size_for(device_type: str) -> int:
    """16384 on CUDA, else 256.

    A shard is the unit of resume, so a kill loses at most one; each costs a file, an fsync and
    a rename (~30 ms), which on a GPU is worth doing about once a second or less: on CUDA a
    shard is over a second of ResNet-50 at full speed, on a CPU about a minute. A resume keeps
    the size its run started with.
    """
    return CUDA_SHARD if device_type == "cuda" else CPU_SHARD


def workers_for(device_type: str, cores: int, ranks: int = 1) -> int:
    """from the device, cores and ranks per node (README: Throughput).

    This process's share of the cores (``cores // ranks``, ``ranks`` the processes on this node:
    torchrun's ``LOCAL_WORLD_SIZE``); on CUDA all of it but one core for the loop, up to 16; on
    a CPU half of it, up to 8; at least 1.
    Example: ``workers_for("cuda", cores=64, ranks=8) == 7``
    """
    share = max(1, cores // max(ranks, 1))
    if device_type == "cuda":
        return max(1, min(share - 1, MAX_CUDA_WORKERS))
    return max(1, min(share // 2, MAX_CPU_WORKERS))


def precision_for(device_type: str) -> str:
    """fp16 on CUDA, else fp32.

    On a CPU, bf16 autocast measured 6x slower than fp32.
    """
    return "fp16" if device_type == "cuda" else "fp32"


def solver_for(head: str) -> str:
    """lbfgs for linear (full batch, like sklearn), adamw for mlp."""
    return "lbfgs" if head == "linear" else "adamw"


def learning_rate_for(solver: str) -> float:
    """1.0 for lbfgs (line search picks the step), 1e-3 for adamw."""
    return 1.0 if solver == "lbfgs" else 1e-3


def weight_decay_for(train_rows: int) -> float:
    """1 / training rows (scikit-learn's C=1)."""
    return 1.0 / max(train_rows, 1)


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a SLURM allocation)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


def default_workers() -> int:
    """DataLoader processes on this machine's CPU (``workers_for`` on the CPU, one rank)."""
    return workers_for("cpu", available_cores())
