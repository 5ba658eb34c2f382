"""Pure readers of the environments a worker can be started in.

Owns: which of the four start shapes we are in (launcher, torchrun, Slurm job step), the mapping of
torchrun's and Slurm's variables to rank / local rank / world size / node rank / master address and
port, Slurm's hostlist syntax (parsed here, so no job needs `scontrol`), and the run-id rule.

Every function takes a `Mapping` (pass `os.environ`); nothing here reads or writes the real
environment, imports torch, or touches the network, so all of it is tested with synthetic dicts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Mode = Literal["launcher", "torchrun", "slurm"]
SLURM_PORT_BASE = 15000  # MASTER_PORT = base + job id % span: same on every task, no coordination
SLURM_PORT_SPAN = 20000


class EnvError(ValueError):
    """An environment that claims to be distributed but is inconsistent."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job. In launcher mode it describes the launcher itself."""

    mode: Mode
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    nnodes: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    restart_count: int = 0

    @property
    def is_worker(self) -> bool:
        return self.mode != "launcher"

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def _int(environ: Mapping[str, str], key: str, default: int | None = None) -> int:
    value = environ.get(key)
    if value is None or value == "":
        if default is None:
            raise EnvError(f"{key} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise EnvError(f"{key}={value!r} is not an integer") from None


def is_torchrun(environ: Mapping[str, str]) -> bool:
    """torchrun and elastic_launch workers carry these; a plain shell does not."""
    return "TORCHELASTIC_RUN_ID" in environ or all(k in environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def is_slurm_step(environ: Mapping[str, str]) -> bool:
    """Inside `srun` with several tasks. The batch shell also has SLURM_NTASKS and SLURM_PROCID=0,
    but no SLURM_STEP_ID: treating it as a worker would make it wait forever for rank 1.
    A one-task step (`srun python -m harness.train`, `srun --pty bash`) starts its own workers."""
    return "SLURM_STEP_ID" in environ and "SLURM_PROCID" in environ and _int(environ, "SLURM_NTASKS", 1) > 1


def detect(environ: Mapping[str, str]) -> DistEnv:
    """torchrun/elastic variables first; then a Slurm job step; else launcher."""
    if is_torchrun(environ):
        return _from_torchrun(environ)
    if is_slurm_step(environ):
        return _from_slurm(environ)
    return DistEnv("launcher", restart_count=_int(environ, "SLURM_RESTART_COUNT", 0))


def _from_torchrun(environ: Mapping[str, str]) -> DistEnv:
    world = _int(environ, "WORLD_SIZE")
    local_world = _int(environ, "LOCAL_WORLD_SIZE", world)
    rank = _int(environ, "RANK")
    if not 0 <= rank < world:
        raise EnvError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return DistEnv(
        "torchrun",
        rank=rank,
        local_rank=_int(environ, "LOCAL_RANK"),
        world_size=world,
        local_world_size=local_world,
        node_rank=_int(environ, "GROUP_RANK", rank // max(local_world, 1)),
        nnodes=_int(environ, "GROUP_WORLD_SIZE", max(world // max(local_world, 1), 1)),
        master_addr=environ.get("MASTER_ADDR"),
        master_port=_int(environ, "MASTER_PORT", 0) or None,
        restart_count=_int(environ, "TORCHELASTIC_RESTART_COUNT", 0),
    )


def _from_slurm(environ: Mapping[str, str]) -> DistEnv:
    world = _int(environ, "SLURM_NTASKS")
    rank = _int(environ, "SLURM_PROCID")
    node_rank = _int(environ, "SLURM_NODEID", 0)
    nnodes = _int(environ, "SLURM_STEP_NUM_NODES", _int(environ, "SLURM_NNODES", 1))
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or ""
    per_node = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    if per_node:
        counts = expand_tasks_per_node(per_node)
        local_world = counts[node_rank] if node_rank < len(counts) else counts[-1]
    else:
        local_world = max(world // max(nnodes, 1), 1)
    job_id = _int(environ, "SLURM_JOB_ID", 0)
    hosts = parse_hostlist(nodelist) if nodelist else []
    return DistEnv(
        "slurm",
        rank=rank,
        local_rank=_int(environ, "SLURM_LOCALID", 0),
        world_size=world,
        local_world_size=local_world,
        node_rank=node_rank,
        nnodes=nnodes,
        # rank 0 runs on the step's first node and hosts the store there
        master_addr=environ.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1"),
        master_port=_int(environ, "MASTER_PORT", 0) or SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN,
        restart_count=_int(environ, "SLURM_RESTART_COUNT", 0),
    )


def expand_tasks_per_node(value: str) -> list[int]:
    """Slurm's compressed counts: '2(x3),1' -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in value.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise EnvError(f"SLURM_TASKS_PER_NODE={value!r} is malformed at {part!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise EnvError(f"hostlist {text!r}: unbalanced ']'")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise EnvError(f"hostlist {text!r}: unbalanced '['")
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_range(spec: str, whole: str) -> list[str]:
    out: list[str] = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise EnvError(f"hostlist {whole!r}: bad range {item!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise EnvError(f"hostlist {whole!r}: range {item!r} runs backwards")
        width = len(lo)  # Slurm keeps the zero padding of the lower bound: n[08-10] -> n08 n09 n10
        out += [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
    return out


def parse_hostlist(text: str) -> list[str]:
    """Expand a Slurm hostlist ('gpu[01-03,07],cpu5', 'rack[1-2]-node[1-2]') in Slurm's order."""
    hosts: list[str] = []
    for part in _split_top_level(text.strip()):
        names = [""]
        for literal, spec in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", part):
            choices = _expand_range(spec, text) if spec else [""]
            names = [n + literal + c for n in names for c in choices]
        hosts += names
    return hosts


def run_id(environ: Mapping[str, str], job_num: int | None = None) -> str | None:
    """The one run-id rule; None means "rank 0 picks a timestamp and shares it".

    1. HARNESS_RUN_ID (the launcher sets it for its workers; users may too);
    2. the Slurm job (array job and task where set), so a requeued job finds its own run;
    3. TORCHELASTIC_RUN_ID unless it is 'none' (torchrun without --rdzv-id);
    plus Hydra's job number in a multirun.
    """
    rid = environ.get("HARNESS_RUN_ID")
    if rid:
        return rid
    if environ.get("SLURM_JOB_ID"):
        array_job, task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
        base = f"slurm-{array_job}_{task}" if array_job and task else f"slurm-{environ['SLURM_JOB_ID']}"
    elif environ.get("TORCHELASTIC_RUN_ID", "none") not in ("", "none"):
        base = f"elastic-{environ['TORCHELASTIC_RUN_ID']}"
    else:
        return None
    return base if job_num is None else f"{base}-{job_num}"
