"""More ONNX operators for ``onnx_graph``'s executor: the normalisations transformers and GroupNorm
networks export to (LayerNormalization, InstanceNormalization, GroupNormalization), the comparisons,
logic, Where and Mod that torch's legacy exporter writes for ``nn.MultiheadAttention``, and a few
element-wise and shape operators common in classifiers. Each follows the ONNX operator's definition
for the opsets torch and other converters write (13-21); ``tests/test_formats_onnx.py`` checks them
against onnxruntime."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .onnx_graph import _FIXED_INPUTS, OPS, OUTPUTS_KEY, _ints, _reduce, op


@op("LayerNormalization")
def _layer_norm(i, a):
    x, scale = i[0], i[1]
    bias = i[2] if len(i) > 2 else None
    axis = int(a.get("axis", -1)) % x.dim()
    eps = float(a.get("epsilon", 1e-5))
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    inv_std = torch.rsqrt(x.var(dim=dims, unbiased=False, keepdim=True) + eps)
    shape = tuple(x.shape[axis:])
    if tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
        y = F.layer_norm(x, shape, scale, bias, eps)  # the fused kernel where the shapes allow it
    else:  # scale and bias broadcast to the normalised shape
        y = (x - mean) * inv_std * scale + (0 if bias is None else bias)
    return [y, mean, inv_std]


@op("InstanceNormalization")
def _instance_norm(i, a):
    x, scale, bias = i[0], i[1], i[2]
    return [F.instance_norm(x, weight=scale, bias=bias, eps=float(a.get("epsilon", 1e-5)))]


@op("GroupNormalization")
def _group_norm(i, a):
    """Opset 18 gives scale and bias one value per group, opset 21 one per channel."""
    x, scale, bias = i[0], i[1], i[2]
    groups, channels = int(a["num_groups"]), x.shape[1]
    y = F.group_norm(x, groups, eps=float(a.get("epsilon", 1e-5)))
    if scale.numel() == groups and groups != channels:
        scale, bias = (t.repeat_interleave(channels // groups) for t in (scale, bias))
    view = (1, channels) + (1,) * (x.dim() - 2)
    return [y * scale.reshape(view) + bias.reshape(view)]


def _binary(fn):
    return lambda i, a: [fn(i[0], i[1])]


for _name, _fn in {
    "Equal": torch.eq,
    "Less": torch.lt,
    "LessOrEqual": torch.le,
    "Greater": torch.gt,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}.items():
    OPS[_name] = _binary(_fn)

OPS["Not"] = lambda i, a: [torch.logical_not(i[0])]
OPS["Where"] = lambda i, a: [torch.where(i[0].bool(), i[1], i[2])]
# fmod = 0: the result takes the divisor's sign (Python's %, torch.remainder); 1: the dividend's (C's fmod)
OPS["Mod"] = lambda i, a: [(torch.fmod if int(a.get("fmod", 0)) else torch.remainder)(i[0], i[1])]


def _variadic(fn):
    def run(i, a):
        out = i[0]
        for t in i[1:]:
            out = fn(out, t)
        return [out]

    return run


OPS["Min"] = _variadic(torch.minimum)
OPS["Max"] = _variadic(torch.maximum)
OPS["Sum"] = _variadic(torch.add)
OPS["Mean"] = lambda i, a: [_variadic(torch.add)(i, a)[0] / len(i)]

OPS["Softplus"] = lambda i, a: [F.softplus(i[0])]
OPS["Softsign"] = lambda i, a: [F.softsign(i[0])]
OPS["Mish"] = lambda i, a: [F.mish(i[0])]
OPS["Selu"] = lambda i, a: [
    float(a.get("gamma", 1.0507009873554805)) * F.elu(i[0], float(a.get("alpha", 1.6732632423543772)))
]
OPS["PRelu"] = lambda i, a: [torch.where(i[0] >= 0, i[0], i[0] * i[1])]
OPS["Sin"] = lambda i, a: [torch.sin(i[0])]
OPS["Cos"] = lambda i, a: [torch.cos(i[0])]
OPS["Floor"] = lambda i, a: [torch.floor(i[0])]
OPS["Ceil"] = lambda i, a: [torch.ceil(i[0])]
OPS["Sign"] = lambda i, a: [torch.sign(i[0])]
OPS["Einsum"] = lambda i, a: [
    torch.einsum(a["equation"].decode() if isinstance(a["equation"], bytes) else a["equation"], *i)
]
OPS["Range"] = lambda i, a: [torch.arange(i[0].item(), i[1].item(), i[2].item(), dtype=i[0].dtype)]
OPS["Tile"] = lambda i, a: [torch.tile(i[0], tuple(_ints(i[1])))]


OPS["ReduceMin"] = _reduce(torch.amin)
OPS["ReduceL1"] = _reduce(lambda x, dim, keepdim: x.abs().sum(dim=dim, keepdim=keepdim))
OPS["ReduceL2"] = _reduce(lambda x, dim, keepdim: x.pow(2).sum(dim=dim, keepdim=keepdim).sqrt())
OPS["ReduceSumSquare"] = _reduce(lambda x, dim, keepdim: x.pow(2).sum(dim=dim, keepdim=keepdim))


@op("Split")
def _split(i, a) -> list[Tensor]:
    """Sizes from the second input (opset 13+) or the ``split`` attribute; otherwise equal parts, as
    many as the node has outputs (``num_outputs`` from opset 18: the last part may be smaller)."""
    x = i[0]
    axis = int(a.get("axis", 0)) % x.dim()
    if len(i) > 1 and i[1] is not None:
        sizes = _ints(i[1])
    elif "split" in a:
        sizes = _ints(a["split"])
    else:
        parts = int(a.get("num_outputs", a.get(OUTPUTS_KEY, 1)))
        size = -(-x.shape[axis] // parts)  # ceil
        sizes = [min(size, x.shape[axis] - k * size) for k in range(parts)]
    return list(torch.split(x, sizes, dim=axis))


# inputs of these operators that are never weights, even when stored as float initializers
_FIXED_INPUTS |= {
    "Where": (1, 2),  # the fill values of masks (0, -inf)
    "Equal": (0, 1),
    "Less": (0, 1),
    "LessOrEqual": (0, 1),
    "Greater": (0, 1),
    "GreaterOrEqual": (0, 1),
    "Mod": (1,),
    "Range": (0, 1, 2),
    "Tile": (1,),
    "Split": (1,),
}
