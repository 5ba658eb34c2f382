"""YOLOv5's `utils/torch_utils.py`, by the same names and signatures: the one import users need.

    from harness.utils.torch_utils import select_device, ModelEMA, EarlyStopping, model_info, ...

The code lives in small modules next to this one; this file only gathers it:

| names                                                        | module                         |
| ------------------------------------------------------------ | ------------------------------ |
| select_device, time_sync                                     | harness/utils/device.py        |
| profile, model_info, count_flops                             | harness/utils/profiling.py     |
| fuse_conv_and_bn, fuse_model                                 | harness/utils/fuse.py          |
| initialize_weights, find_modules, scale_img, de_parallel,    | harness/utils/modules.py       |
| is_parallel, copy_attr, smart_inference_mode                 |                                |
| ModelEMA                                                     | harness/utils/ema.py           |
| EarlyStopping (rank 0 decides under DDP)                     | harness/utils/early_stopping.py|
| load_classifier, reshape_classifier_output                   | harness/utils/classifier.py    |
| date_modified, git_describe                                  | harness/utils/meta.py          |
| torch_distributed_zero_first                                 | harness/zero_first.py          |

The device grammar itself is harness/devices.py's; the batch check is harness/batching.py's.
"""

from __future__ import annotations

from harness.utils.classifier import load_classifier, reshape_classifier_output
from harness.utils.device import select_device, time_sync
from harness.utils.early_stopping import EarlyStopping
from harness.utils.ema import ModelEMA
from harness.utils.fuse import fuse_conv_and_bn, fuse_model
from harness.utils.meta import date_modified, git_describe
from harness.utils.modules import (
    copy_attr,
    de_parallel,
    find_modules,
    initialize_weights,
    is_parallel,
    scale_img,
    smart_inference_mode,
)
from harness.utils.profiling import count_flops, model_info, profile
from harness.zero_first import torch_distributed_zero_first

__all__ = [
    "EarlyStopping",
    "ModelEMA",
    "copy_attr",
    "count_flops",
    "date_modified",
    "de_parallel",
    "find_modules",
    "fuse_conv_and_bn",
    "fuse_model",
    "git_describe",
    "initialize_weights",
    "is_parallel",
    "load_classifier",
    "model_info",
    "profile",
    "reshape_classifier_output",
    "scale_img",
    "select_device",
    "smart_inference_mode",
    "time_sync",
    "torch_distributed_zero_first",
]
