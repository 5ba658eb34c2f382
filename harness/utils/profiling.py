"""What a model costs: `model_info` (layers, parameters, GFLOPs at an image size) and `profile`
(YOLOv5's per-op table of parameters, GFLOPs, GPU memory, forward and backward time).

FLOPs come from `torch.utils.flop_counter` (a multiply-add counts 2, as YOLOv5's 2 x thop MACs).
`model_info` counts on the meta device: no memory, no compute, exact at any image size.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from harness.utils.device import say, select_device, time_sync
from harness.utils.modules import require_whole

HEADER = (f"{'Params':>12s}{'GFLOPs':>12s}{'GPU_mem (GB)':>14s}{'forward (ms)':>14s}{'backward (ms)':>14s}"
          f"{'input':>24s}{'output':>24s}")


def count_flops(op: Callable[..., Any], *inputs: Any) -> int:
    """FLOPs of one forward call `op(*inputs)` (backward is not run, so not counted)."""
    # detached: under no_grad, FlopCounterMode's module tracker fails on a view of an input that requires grad
    inputs = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in inputs)
    with FlopCounterMode(display=False) as counter:
        op(*inputs)
    return counter.get_total_flops()


def _eval_flops(model: nn.Module, x: torch.Tensor, *, meta: bool) -> int:
    """FLOPs of model(x) in eval mode (no BN statistics or dropout touched); restores every module's mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        if not meta:
            return count_flops(copy.deepcopy(model), x)
        state = {name: torch.empty_like(t, device="meta")
                 for name, t in itertools.chain(model.named_parameters(), model.named_buffers())}
        return count_flops(lambda t: functional_call(model, state, (t,)), x.to("meta"))
    finally:
        for m, training in modes:
            m.training = training


def _guess_input(model: nn.Module, img_size: int | Sequence[int]) -> tuple[int, ...] | None:
    """YOLOv5's guess, made explicit: an image batch of 1 if the first layer is a Conv2d, a feature
    vector if it is a Linear; None (no GFLOPs) for anything else."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return (1, m.in_channels, h, w)
        if isinstance(m, nn.Linear):
            return (1, m.in_features)
        if m._parameters:
            return None
    return None


def model_info(
    model: nn.Module,
    verbose: bool = False,
    img_size: int | Sequence[int] = 640,
    *,
    input_shape: Sequence[int] | None = None,
) -> tuple[int, int, int, float | None]:
    """Log `<Model> summary: L layers, P parameters, G gradients, F GFLOPs`; return (L, P, G, F).

    GFLOPs are for one image of `img_size` (int or [h, w]), or for exactly `input_shape` when given;
    None when they cannot be measured. `verbose` prints YOLOv5's per-parameter table first.
    """
    params = list(model.parameters())
    n_p = sum(p.numel() for p in params)
    n_g = sum(p.numel() for p in params if p.requires_grad)
    n_l = len(list(model.modules()))
    if verbose:
        print(f"{'layer':>5} {'name':>40} {'gradient':>9} {'parameters':>12} {'shape':>20} "
              f"{'mu':>10} {'sigma':>10}")
        for i, (name, p) in enumerate(model.named_parameters()):
            q = p.detach().float()
            mu = q.mean().item() if not q.is_meta else 0.0
            sigma = q.std().item() if q.numel() > 1 and not q.is_meta else 0.0
            name = name.replace("module_list.", "")
            print(f"{i:5g} {name:>40s} {p.requires_grad!s:>9s} {p.numel():12g} {str(list(p.shape)):>20s} "
                  f"{mu:10.3g} {sigma:10.3g}")

    shape = tuple(input_shape) if input_shape is not None else _guess_input(model, img_size)
    gflops = None
    if shape is not None:
        dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
        device = params[0].device if params else torch.device("cpu")
        for meta in (True, False):  # a model that cannot run on meta tensors is counted for real
            try:
                x = torch.zeros(shape, dtype=dtype, device="meta" if meta else device)
                gflops = _eval_flops(model, x, meta=meta) / 1e9
                break
            except Exception:
                continue
    name = type(model).__name__
    fs = f", {gflops:.4g} GFLOPs" if gflops is not None else ""
    say(f"{name} summary: {n_l} layers, {n_p} parameters, {n_g} gradients{fs}")
    return n_l, n_p, n_g, gflops


def _scalar(y: Any) -> torch.Tensor:
    return sum(yi.sum() for yi in y) if isinstance(y, (list, tuple)) else y.sum()  # type: ignore[return-value]


def _shape(t: Any) -> tuple[int, ...] | str:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else "list"


def profile(
    input: torch.Tensor | list[torch.Tensor],
    ops: Callable[..., Any] | list[Callable[..., Any]],
    n: int = 10,
    device: torch.device | str | None = None,
) -> list[list[Any] | None]:
    """For each input x op, print and return [params, GFLOPs, GPU_mem (GB), forward ms, backward ms,
    input shape, output shape] (times averaged over `n` runs). An op without backward gets NaN
    backward; an op that raises gets a None row and its error printed, and the rest still run.

        profile(torch.randn(16, 3, 640, 640), [nn.SiLU(), nn.ReLU()], n=100)
    """
    if n < 1:
        raise ValueError(f"profile n={n} must be >= 1 (runs per op)")
    if not isinstance(device, torch.device):
        device = select_device(device or "")
    results: list[list[Any] | None] = []
    print(HEADER)
    for x in input if isinstance(input, list) else [input]:
        x = x.detach().to(device)
        if x.is_floating_point():
            x.requires_grad_(True)
        for m in ops if isinstance(ops, list) else [ops]:
            if isinstance(m, nn.Module):
                try:
                    require_whole(m, "profile")
                except TypeError as exc:
                    print(exc)
                    results.append(None)
                    continue
            m = m.to(device) if hasattr(m, "to") else m
            m = m.half() if hasattr(m, "half") and x.dtype is torch.float16 else m
            try:
                flops = count_flops(m, x) / 1e9
            except Exception:
                flops = 0.0
            tf = tb = 0.0
            try:
                for _ in range(n):
                    t0 = time_sync()
                    y = m(x)
                    t1 = time_sync()
                    try:
                        _scalar(y).backward()
                        t2 = time_sync()
                    except Exception:  # no backward (integer output, no grad path): NaN, as YOLOv5
                        t2 = float("nan")
                    tf += (t1 - t0) * 1000 / n
                    tb += (t2 - t1) * 1000 / n
                mem = torch.cuda.memory_reserved(device) / 1e9 if device.type == "cuda" else 0.0
                s_in, s_out = _shape(x), _shape(y)
                p = sum(q.numel() for q in m.parameters()) if isinstance(m, nn.Module) else 0
                print(f"{p:12}{flops:12.4g}{mem:>14.3f}{tf:14.4g}{tb:14.4g}{str(s_in):>24s}{str(s_out):>24s}")
                results.append([p, flops, mem, tf, tb, s_in, s_out])
            except Exception as e:
                print(f"{type(e).__name__}: {e}")
                results.append(None)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results
