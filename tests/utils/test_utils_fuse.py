"""harness.utils.fuse: a fused conv equals conv -> bn (eval) for every conv shape; whole-model fusion."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.utils.torch_utils import fuse_conv_and_bn, fuse_model

TOL = 1e-5  # max |fused - reference| / max |reference|, float32


def randomize_bn(bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Statistics and affine parameters far from the identity, so a wrong fold shows."""
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
        if bn.affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)


def rel_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max()).item()


CASES = [  # stride, padding, dilation, groups, bias, padding_mode
    (1, 0, 1, 1, False, "zeros"),
    (1, 1, 1, 1, True, "zeros"),
    (2, 1, 1, 1, False, "zeros"),
    (2, 3, 3, 1, True, "zeros"),
    (1, 2, 2, 4, False, "zeros"),
    (3, 1, 1, 2, True, "zeros"),
    (1, 1, 1, 8, False, "zeros"),  # depthwise
    (1, "same", 2, 2, True, "zeros"),
    (2, 1, 1, 1, True, "reflect"),
    (1, 2, 1, 4, False, "circular"),
]


@pytest.mark.parametrize("stride,padding,dilation,groups,bias,padding_mode", CASES)
def test_fused_conv2d_equals_conv_bn(stride, padding, dilation, groups, bias, padding_mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias,
                     padding_mode=padding_mode)
    bn = nn.BatchNorm2d(16)
    randomize_bn(bn)
    ref_model = nn.Sequential(conv, bn).eval()
    fused = fuse_conv_and_bn(conv, bn)
    x = torch.randn(2, 8, 17, 19)
    with torch.no_grad():
        ref, out = ref_model(x), fused(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert rel_error(out, ref) <= TOL
    assert (fused.stride, fused.padding, fused.dilation, fused.groups, fused.padding_mode) == \
        (conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode)
    assert fused.bias is not None and not fused.weight.requires_grad


@pytest.mark.parametrize("kind", [nn.Conv1d, nn.Conv3d])
def test_fused_conv1d_conv3d(kind):
    torch.manual_seed(1)
    conv = kind(4, 6, 3, stride=2, padding=1, groups=2, bias=True)
    bn = (nn.BatchNorm1d if kind is nn.Conv1d else nn.BatchNorm3d)(6)
    randomize_bn(bn)
    x = torch.randn(2, 4, *([9] * (1 if kind is nn.Conv1d else 3)))
    with torch.no_grad():
        assert rel_error(fuse_conv_and_bn(conv, bn)(x), bn.eval()(conv(x))) <= TOL


def test_fuse_bn_without_affine():
    torch.manual_seed(2)
    conv, bn = nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5, affine=False)
    randomize_bn(bn)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert rel_error(fuse_conv_and_bn(conv, bn)(x), bn.eval()(conv(x))) <= TOL


def test_fuse_refuses_what_cannot_fold():
    with pytest.raises(ValueError, match="running statistics"):
        fuse_conv_and_bn(nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5, track_running_stats=False))
    with pytest.raises(ValueError, match="4 features but the conv 5"):
        fuse_conv_and_bn(nn.Conv2d(3, 5, 1), nn.BatchNorm2d(4))
    with pytest.raises(TypeError):
        fuse_conv_and_bn(nn.Linear(3, 5), nn.BatchNorm1d(5))


class YoloConv(nn.Module):
    """YOLOv5's Conv: act(bn(conv(x))), with forward_fuse for the fused model."""

    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x):
        return self.act(self.conv(x))


def test_fuse_model():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
        YoloConv(8, 8),
        nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(), nn.BatchNorm2d(8)),  # BN after the ReLU: not a pair
        nn.Conv2d(8, 4, 1),
        nn.BatchNorm2d(4),
    )
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomize_bn(m)
    model.eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        ref = model(x)
        assert fuse_model(model) is model
        out = model(x)
    assert rel_error(out, ref) <= TOL
    left = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert left == [model[2][2]]
    assert not hasattr(model[1], "bn") and isinstance(model[4], nn.Identity)
