"""`python -m harness.info`: the banner, then everything a bug report needs, as plain text to paste.

Versions (harness, Python, torch, Hydra), CUDA and the distributed backends this torch can use,
CPU and RAM, the GPUs this process sees, and the launcher variables (torchrun, Slurm, NCCL, OMP)
with the mode `harness.env.detect` derives from them. The environment is read once, in `main`;
`launcher_section` is pure and takes a Mapping.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from importlib import metadata

import psutil
import torch

from harness import errors
from harness.devices import count_visible_gpus
from harness.env import detect
from harness.utils.device import banner_for
from harness.utils.meta import describe_version

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                 "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
PREFIXES = ("TORCHELASTIC_", "SLURM_", "NCCL_", "HARNESS_")
OTHER_VARS = ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "PYTORCH_CUDA_ALLOC_CONF", "CUBLAS_WORKSPACE_CONFIG")


def _version(dist_name: str) -> str:
    try:
        return metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _gb(n: float) -> str:
    return f"{n / (1 << 30):.1f} GB"


def launcher_section(environ: Mapping[str, str]) -> list[str]:
    """The launcher variables that are set, and the mode they imply (or why they are inconsistent)."""
    keys = [k for k in TORCHRUN_VARS + OTHER_VARS if k in environ]
    keys += sorted(k for k in environ if k.startswith(PREFIXES) and k not in keys)
    lines = [f"  {k}={environ[k]}" for k in keys] or ["  (none set)"]
    try:
        env = detect(environ)
        mode = f"{env.mode} (rank {env.rank} of {env.world_size})" if env.is_worker else env.mode
    except ValueError as exc:
        mode = f"inconsistent: {exc}"
    return [f"launcher variables (mode: {mode}):", *lines]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpus(visible: int) -> list[str]:
    if not visible or not torch.cuda.is_available():
        return []
    lines = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        lines.append(f"  cuda:{i}: {p.name}, {p.total_memory / (1 << 20):.0f} MiB, "
                     f"compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs")
    return lines


def report(environ: Mapping[str, str]) -> str:
    import torch.distributed as dist

    vm = psutil.virtual_memory()
    visible = count_visible_gpus()
    gpu_lines = _gpus(visible)
    head = banner_for(range(len(gpu_lines)))
    nccl = dist.is_available() and dist.is_nccl_available()
    nccl_version = ".".join(map(str, torch.cuda.nccl.version())) if nccl else ""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [
        head,
        "",
        f"harness     {describe_version() or 'unknown'} ({os.path.dirname(os.path.abspath(__file__))})",
        f"python      {sys.version.split()[0]} ({sys.executable})",
        f"platform    {platform.platform()}",
        f"torch       {torch.__version__} (CUDA build {torch.version.cuda or 'none'}, "
        f"debug {torch.version.debug})",
        f"packages    hydra-core {_version('hydra-core')}, omegaconf {_version('omegaconf')}, "
        f"numpy {_version('numpy')}, psutil {_version('psutil')}",
        f"CUDA        available {torch.cuda.is_available()}, "
        f"cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else 'none'}",
        f"backends    gloo {dist.is_available() and dist.is_gloo_available()}, "
        f"nccl {nccl}{f' {nccl_version}' if nccl else ''}, "
        f"mpi {dist.is_available() and dist.is_mpi_available()}",
        f"CPU         {_cpu_model()}: {os.cpu_count()} logical, {psutil.cpu_count(logical=False)} physical, "
        f"{affinity} usable by this process, torch threads {torch.get_num_threads()}",
        f"RAM         {_gb(vm.total)} total, {_gb(vm.available)} available",
        f"GPUs        {visible} visible (CUDA_VISIBLE_DEVICES={environ.get('CUDA_VISIBLE_DEVICES')!r})",
        *gpu_lines,
        "",
        *launcher_section(environ),
    ]
    return "\n".join(lines)


@errors.entry_point()
def main() -> int:
    print(report(os.environ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
