"""YOLOv5's `select_device` and `time_sync`, on the harness's one device grammar.

The grammar, the check against visible GPUs and the banner text live in `harness.devices`; the batch
check in `harness.batching`. This module turns them into the YOLOv5 call users know. `say` is how
the toolbox prints: through the `harness` logger when someone configured it, else to stdout.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

import torch

from harness.batching import plan_batch
from harness.devices import banner, count_visible_gpus, parse_device, plan_devices
from harness.utils.meta import describe_version

LOGGER = "harness"  # the name harness/logs.py configures; not imported from there (utils sits below it)


def say(text: str) -> None:
    """Log `text` at INFO on the `harness` logger when that would show it (a run configured it), else print.

    YOLOv5 configured its logger at import; ours is configured by the session, so a script that uses the
    toolbox on its own would otherwise lose the banner and summaries."""
    log = logging.getLogger(LOGGER)
    if log.isEnabledFor(logging.INFO) and log.hasHandlers():
        log.info(text)
    else:
        print(text, flush=True)


def banner_for(gpu_ids: Sequence[int]) -> str:
    """The start-up banner, built one way for every caller (a session, `select_device`, `python -m
    harness.info`): this checkout's version, torch's, and the GPUs `gpu_ids` (visible indices), or
    the CPU's cores and RAM when there are none."""
    import psutil

    gpus = []
    for i in gpu_ids:
        p = torch.cuda.get_device_properties(i)
        gpus.append((i, p.name, p.total_memory))
    return banner(version=describe_version(), torch_version=torch.__version__, gpus=gpus,
                  cpu_cores=os.cpu_count(), ram_bytes=psutil.virtual_memory().total)


def select_device(
    device: object = "", batch_size: int | None = None, *, verbose: bool = True
) -> torch.device:
    """The torch.device for `device` ('', 'cpu', '0', '0,1', 'cuda:1', [0, 1] ...), with YOLOv5's banner.

    Ids are checked as ids: YOLOv5 compared the GPU count with the number of characters, so '10'
    passed on a 2-GPU box and failed later. A `batch_size` > 0 must split evenly over the requested
    GPUs (None, 0 and YOLOv5's -1 for autobatch skip the check).

    Unlike YOLOv5 it does not write CUDA_VISIBLE_DEVICES: it returns `cuda:<first requested id>`.
    The mask only takes effect if it is set before the CUDA runtime starts, and any earlier
    `torch.cuda.is_available()` starts it without a trace torch can report; a mask written too late
    made YOLOv5 return cuda:0 for `device='3'` and silently use GPU 0. Narrow the GPUs a process sees
    before it starts (the launcher does: harness/launch.py, harness/runtime.py); in DDP each rank
    passes its own id.
    """
    request = parse_device(device)
    visible = 0 if request.kind == "cpu" else count_visible_gpus()
    if visible and not torch.cuda.is_available():
        visible = 0  # NVML sees GPUs that the CUDA runtime cannot use (driver mismatch)
    plan = plan_devices(request, visible_gpus=visible, current_mask=os.environ.get("CUDA_VISIBLE_DEVICES"),
                        raw=device)
    if batch_size is not None and batch_size > 0:
        plan_batch(batch_size, max(len(plan.ids), 1))
    if verbose:
        say(banner_for(plan.ids))
    return torch.device("cpu") if plan.kind == "cpu" else torch.device("cuda", plan.ids[0])


def time_sync() -> float:
    """A timestamp in seconds (perf_counter), taken after pending CUDA work finishes when CUDA is in use."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()
