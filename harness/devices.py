"""Device strings -> a device plan.

Owns the `device=` grammar (YOLOv5's, made strict), the check of a request against the GPUs this
process can see, the `CUDA_VISIBLE_DEVICES` value handed to workers, and the banner text. Everything
here is pure: callers pass in the facts (visible GPU count, the current mask, whether CUDA is already
initialised). Reading and writing the environment happens in `launch.py`; counting GPUs in
`count_visible_gpus`, the one function here that touches torch.

Grammar (case and spaces ignored):

| value                     | means                                        |
| ------------------------- | -------------------------------------------- |
| `''`, `auto`              | every visible GPU, else the CPU              |
| `cpu`                     | the CPU (`dist.nproc` processes)             |
| `0`, `0,1,2,3`, `10`      | GPU indices among the visible GPUs           |
| `cuda`                    | every visible GPU; an error if there is none |
| `cuda:0`, `cuda:0,1`      | the same as `0`, `0,1`                       |
| `[0,1]` (a list)          | the same as `0,1`                            |
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

VALID_FORMS = "'' or 'auto', 'cpu', 'cuda', GPU indices like '0' or '0,1,2,3', or 'cuda:0' / 'cuda:0,1'"
_ID = re.compile(r"\d+")


class DeviceError(ValueError):
    """A device request that cannot be met; the message names the value and what is valid."""


@dataclass(frozen=True)
class DeviceRequest:
    """What the user asked for: `ids=None` means "every visible GPU"."""

    kind: Literal["auto", "cpu", "cuda"]
    ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class DevicePlan:
    """What the launcher will do: `nproc` processes on this node, each on one device."""

    kind: Literal["cpu", "cuda"]
    ids: tuple[int, ...]  # GPU indices among the GPUs visible to the launcher; () on CPU
    nproc: int
    cuda_visible_devices: str | None  # the mask for the workers; None leaves the environment alone

    @property
    def backend(self) -> str:
        return "nccl" if self.kind == "cuda" else "gloo"


def _as_text(value: object) -> str:
    """Hydra hands us a str, an int (`device=0`), or a list (`device=[0,1]`)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        raise DeviceError(f"device={value!r} is not a device; valid: {VALID_FORMS}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Sequence) and not isinstance(value, str):
        return ",".join(_as_text(v) for v in value)
    return str(value)


def parse_device(value: object) -> DeviceRequest:
    """Parse a device string (or int, or list of ids) into a request. Pure; raises DeviceError."""
    raw = _as_text(value)
    text = re.sub(r"\s+", "", raw).lower()
    if text in ("", "auto"):
        return DeviceRequest("auto")
    if text == "cpu":
        return DeviceRequest("cpu")
    if text == "cuda":
        return DeviceRequest("cuda")
    if text.startswith("cuda:"):
        text = text[len("cuda:") :]
    items = [item.removeprefix("cuda:") for item in text.split(",")]
    bad = [item for item in items if not _ID.fullmatch(item)]
    if bad:
        what = "an empty id" if "" in bad else f"{bad[0]!r} is not a GPU index"
        raise DeviceError(f"device={raw!r} is malformed ({what}); valid: {VALID_FORMS}")
    ids = tuple(int(item) for item in items)
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise DeviceError(f"device={raw!r} names GPU {dupes[0]} more than once; valid: {VALID_FORMS}")
    return DeviceRequest("cuda", ids)


def plan_devices(
    request: DeviceRequest,
    *,
    visible_gpus: int,
    nproc: int = 0,
    current_mask: str | None = None,
    raw: object = None,
) -> DevicePlan:
    """Check a request against what is visible and decide the process count and the workers' mask.

    `nproc` is `dist.nproc` (0 = decide). On GPUs the process count is the number of ids; a different
    `nproc` is an error. `current_mask` is the launcher's own `CUDA_VISIBLE_DEVICES`: indices are
    positions in it, so `device=0,1` under a scheduler's mask `4,5` hands the workers `4,5`.
    """
    shown = repr(_as_text(raw)) if raw is not None else repr(_describe(request))
    if nproc < 0:
        raise DeviceError(f"dist.nproc={nproc} must be >= 0 (0 = one per device, or 1 on CPU)")
    kind = request.kind
    if kind == "auto":
        kind = "cuda" if visible_gpus > 0 else "cpu"
    if kind == "cpu":
        return DevicePlan("cpu", (), nproc or 1, None)

    if visible_gpus == 0:
        raise DeviceError(
            f"device={shown} asks for CUDA GPUs, but none is visible ("
            + (f"CUDA_VISIBLE_DEVICES={current_mask!r}" if current_mask is not None else "no CUDA device found")
            + "); use device=cpu or device=auto"
        )
    ids = request.ids if request.ids is not None else tuple(range(visible_gpus))
    beyond = [i for i in ids if i >= visible_gpus]
    if beyond:
        raise DeviceError(
            f"device={shown} asks for GPU {beyond[0]}, but only {visible_gpus} visible "
            f"(valid indices 0..{visible_gpus - 1})"
        )
    if nproc and nproc != len(ids):
        raise DeviceError(
            f"dist.nproc={nproc} contradicts device={shown} ({len(ids)} GPU(s)): on GPUs the process "
            f"count is the number of ids; drop dist.nproc or set it to {len(ids)}"
        )
    return DevicePlan("cuda", ids, len(ids), worker_mask(ids, current_mask))


def worker_mask(ids: Sequence[int], current_mask: str | None) -> str:
    """The `CUDA_VISIBLE_DEVICES` value that makes visible GPU i of the workers = our GPU ids[i]."""
    if current_mask is None or current_mask.strip() == "":
        return ",".join(str(i) for i in ids)
    parent = [m.strip() for m in current_mask.split(",") if m.strip()]
    return ",".join(parent[i] for i in ids)


def check_mask_change(new_mask: str | None, current_mask: str | None, cuda_initialized: bool) -> None:
    """Refuse to change the mask in a process whose CUDA is already up: CUDA would ignore it."""
    if new_mask is None or not cuda_initialized:
        return
    if (current_mask or "") != new_mask:
        raise DeviceError(
            f"CUDA is already initialised in this process with CUDA_VISIBLE_DEVICES={current_mask!r}; "
            f"it cannot change to {new_mask!r}. Select devices before any CUDA call "
            f"(or start the job with CUDA_VISIBLE_DEVICES={new_mask})"
        )


Shape = Literal["launcher", "launched", "worker"]


@dataclass(frozen=True)
class Placement:
    """Where one process's work goes, decided once for every way of starting it (`place`)."""

    plan: DevicePlan  # the node's processes and their mask: what a launcher starts (plan.nproc workers)
    mask: str | None  # CUDA_VISIBLE_DEVICES for this process, set before CUDA starts; None: leave it
    index: int | None  # this process's GPU among those it sees once `mask` is set; None on the CPU

    @property
    def cuda(self) -> bool:
        return self.index is not None


def place(device: object, *, shape: Shape, visible_gpus: int, current_mask: str | None, cuda_initialized: bool,
          nproc: int = 0, local_rank: int = 0, local_world_size: int = 1) -> Placement:
    """Which devices a process uses, for every start shape (pure: the caller passes in the facts).

    - `launcher`: `python -m harness.train` before it starts its workers: `plan_devices` over
      `dist.nproc` (`nproc`); training in-process (one process) uses the plan's mask itself.
    - `launched`: a process our launcher started (or the launcher training in-process): the mask is
      already set; each process uses visible GPU `local_rank` (0 when it sees one).
    - `worker`: started by torchrun or srun. Explicit ids (`device=2,3`) become this process's mask, one
      id per local rank; otherwise the GPUs it sees are used as they are: visible GPU `local_rank`, or
      GPU 0 when a scheduler gives each task one GPU (`srun --gpus-per-task=1`).
    """
    request = parse_device(device)
    if shape == "launcher":
        plan = plan_devices(request, visible_gpus=visible_gpus, nproc=nproc, current_mask=current_mask, raw=device)
        if plan.nproc > 1:  # the workers get the mask; this process starts no CUDA of its own
            return Placement(plan, None, None)
        check_mask_change(plan.cuda_visible_devices, current_mask, cuda_initialized)
        return Placement(plan, plan.cuda_visible_devices, 0 if plan.kind == "cuda" else None)
    if request.kind != "cpu" and visible_gpus == 0 and request.kind != "auto":
        raise DeviceError(f"device={_as_text(device)!r} asks for CUDA GPUs, but none is visible "
                          f"(CUDA_VISIBLE_DEVICES={current_mask!r}); use device=cpu")
    if request.kind == "cpu" or visible_gpus == 0:
        return Placement(DevicePlan("cpu", (), local_world_size, None), None, None)
    mask, seen = None, visible_gpus
    if shape == "worker" and request.ids is not None:  # torchrun/srun with device=2,3: pin them here
        plan = plan_devices(request, visible_gpus=visible_gpus, nproc=local_world_size, current_mask=current_mask,
                            raw=device)
        mask, seen = plan.cuda_visible_devices, len(plan.ids)
        check_mask_change(mask, current_mask, cuda_initialized)
    plan = DevicePlan("cuda", tuple(range(seen)), local_world_size, mask)
    return Placement(plan, mask, 0 if seen == 1 else local_rank)


def _describe(request: DeviceRequest) -> str:
    if request.ids is None:
        return request.kind
    return ",".join(str(i) for i in request.ids)


def count_visible_gpus() -> int:
    """GPUs visible to this process, counted through NVML so CUDA itself stays uninitialised.

    Any CUDA runtime call freezes `CUDA_VISIBLE_DEVICES` for the process; the launcher must still be
    free to set it for its workers (and for itself when it trains in-process).
    """
    import torch

    if not torch.backends.cuda.is_built():
        return 0
    try:
        from torch.cuda import _device_count_nvml  # private, but the one count that leaves CUDA alone
    except ImportError:  # pragma: no cover - older or newer torch without it
        return torch.cuda.device_count()
    count = _device_count_nvml()
    return count if count >= 0 else 0


def banner(
    *,
    version: str,
    torch_version: str,
    gpus: Sequence[tuple[int, str, int]] = (),
    cpu_cores: int | None = None,
    ram_bytes: int | None = None,
) -> str:
    """YOLOv5-style start-up line: `harness <version> torch <v> CUDA:0 (H100, 81559MiB)` or CPU facts.

    `gpus` holds (index, name, total memory in bytes) for each device this process uses.
    """
    head = f"harness {version or 'unknown'} torch {torch_version}"
    if gpus:
        lines = [f"CUDA:{i} ({name}, {mem / (1 << 20):.0f}MiB)" for i, name, mem in gpus]
        return head + " " + "\n".join(lines)
    facts = []
    if cpu_cores is not None:
        facts.append(f"{cpu_cores} cores")
    if ram_bytes is not None:
        facts.append(f"{ram_bytes / (1 << 30):.1f} GB RAM")
    return head + " CPU" + (f" ({', '.join(facts)})" if facts else "")
