"""Run an ONNX graph as a trainable torch module, and write updated weights back into it.

Why not a converter such as onnx2torch: it imports torchvision, whose PyPI wheels replace a CPU
torch with a multi-GB CUDA build and fail to import beside the CPU build, and it does not read
the newer op versions torch's default exporter writes (opset 18+). Executing the graph node by
node with torch ops keeps the graph exactly as it was: every float initializer becomes a
parameter, and the repaired model is the original ModelProto with only those initializers
replaced, so input/output names, opset, dynamic axes and every other node survive bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import fixed_batches

Op = Callable[[list, dict], list]
OPS: dict[str, Op] = {}


def op(*names: str) -> Callable[[Op], Op]:
    def wrap(fn: Op) -> Op:
        for n in names:
            OPS[n] = fn
        return fn

    return wrap


def _ints(v) -> list[int]:
    return [int(i) for i in (v.tolist() if isinstance(v, Tensor) else v)]


def _pads_2d(pads: list[int], x: Tensor, value: float = 0.0) -> tuple[Tensor, int | tuple]:
    """ONNX pads [x1_begin, x2_begin, ..., x1_end, x2_end] -> symmetric padding or an explicit F.pad."""
    k = len(pads) // 2
    begin, end = pads[:k], pads[k:]
    if begin == end:
        return x, tuple(begin)
    torch_pads = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        torch_pads += [b, e]
    return F.pad(x, torch_pads, value=value), tuple([0] * k)


def _explicit_pads(a: dict, x: Tensor, kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    """The node's pads in ONNX order; ``auto_pad`` SAME_UPPER / SAME_LOWER (TensorFlow's "same", the
    output size ceil(input / stride)) computed for ``x``'s spatial size, the odd pixel at the end
    (UPPER) or the start (LOWER); VALID is no padding."""
    mode = a.get("auto_pad", b"NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    k = len(kernel)
    if mode in ("NOTSET", ""):
        return _ints(a.get("pads", [0] * 2 * k))
    if mode == "VALID":
        return [0] * 2 * k
    begin, end = [], []
    for size, kern, stride, dil in zip(x.shape[2:], kernel, strides, dilations, strict=True):
        total = max((math.ceil(size / stride) - 1) * stride + (kern - 1) * dil + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begin.append(small if mode == "SAME_UPPER" else large)
        end.append(large if mode == "SAME_UPPER" else small)
    return begin + end


@op("Conv")
def _conv(i, a):
    x, w = i[0], i[1]
    b = i[2] if len(i) > 2 and i[2] is not None else None
    k = w.dim() - 2
    strides, dilations = _ints(a.get("strides", [1] * k)), _ints(a.get("dilations", [1] * k))
    x, pad = _pads_2d(_explicit_pads(a, x, list(w.shape[2:]), strides, dilations), x)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[k]
    return [conv(x, w, b, strides, pad, dilations, int(a.get("group", 1)))]


@op("BatchNormalization")
def _bn(i, a):
    x, scale, bias, mean, var = i[:5]
    return [
        F.batch_norm(x, mean.detach(), var.detach(), scale, bias, training=False, eps=float(a.get("epsilon", 1e-5)))
    ]


def _pool(i, a, kind: str):
    x = i[0]
    ks = _ints(a["kernel_shape"])
    k = len(ks)
    strides = _ints(a.get("strides", [1] * k))
    pads = _explicit_pads(a, x, ks, strides, _ints(a.get("dilations", [1] * k)))
    x, pad = _pads_2d(pads, x, value=-math.inf if kind == "max" else 0.0)
    ceil = bool(a.get("ceil_mode", 0))
    if kind == "max":
        fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[k]
        return [fn(x, ks, strides, pad, _ints(a.get("dilations", [1] * k)), ceil)]
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[k]
    return [fn(x, ks, strides, pad, ceil, bool(a.get("count_include_pad", 0)))]


OPS["MaxPool"] = lambda i, a: _pool(i, a, "max")
OPS["AveragePool"] = lambda i, a: _pool(i, a, "avg")
OPS["GlobalAveragePool"] = lambda i, a: [i[0].mean(dim=tuple(range(2, i[0].dim())), keepdim=True)]
OPS["GlobalMaxPool"] = lambda i, a: [i[0].amax(dim=tuple(range(2, i[0].dim())), keepdim=True)]
OPS["Relu"] = lambda i, a: [F.relu(i[0])]
OPS["LeakyRelu"] = lambda i, a: [F.leaky_relu(i[0], float(a.get("alpha", 0.01)))]
OPS["Elu"] = lambda i, a: [F.elu(i[0], float(a.get("alpha", 1.0)))]
OPS["Sigmoid"] = lambda i, a: [torch.sigmoid(i[0])]
OPS["Tanh"] = lambda i, a: [torch.tanh(i[0])]
OPS["HardSigmoid"] = lambda i, a: [(float(a.get("alpha", 0.2)) * i[0] + float(a.get("beta", 0.5))).clamp(0, 1)]
OPS["HardSwish"] = lambda i, a: [F.hardswish(i[0])]
OPS["Erf"] = lambda i, a: [torch.erf(i[0])]
OPS["Gelu"] = lambda i, a: [F.gelu(i[0], approximate="tanh" if a.get("approximate") in (b"tanh", "tanh") else "none")]
OPS["Sqrt"] = lambda i, a: [torch.sqrt(i[0])]
OPS["Exp"] = lambda i, a: [torch.exp(i[0])]
OPS["Log"] = lambda i, a: [torch.log(i[0])]
OPS["Neg"] = lambda i, a: [-i[0]]
OPS["Abs"] = lambda i, a: [i[0].abs()]
OPS["Reciprocal"] = lambda i, a: [1.0 / i[0]]
OPS["Pow"] = lambda i, a: [torch.pow(i[0], i[1])]
OPS["Add"] = lambda i, a: [i[0] + i[1]]
OPS["Sub"] = lambda i, a: [i[0] - i[1]]
OPS["Mul"] = lambda i, a: [i[0] * i[1]]
OPS["Div"] = lambda i, a: [i[0] / i[1] if i[0].is_floating_point() else torch.div(i[0], i[1], rounding_mode="trunc")]
OPS["MatMul"] = lambda i, a: [torch.matmul(i[0], i[1])]
OPS["Identity"] = lambda i, a: [i[0]]
OPS["Dropout"] = lambda i, a: [i[0]]


def _softmax(fn: Callable[[Tensor, int], Tensor]) -> Op:
    """Softmax / LogSoftmax. From opset 13 along ``axis`` (default -1); before, over the tensor
    flattened to 2-D at ``axis`` (default 1): the same for a [N, K] input, not for a 4-D one."""

    def run(i, a):
        x = i[0]
        if a.get(OPSET_KEY, 13) >= 13:
            return [fn(x, int(a.get("axis", -1)))]
        axis = int(a.get("axis", 1)) % max(x.dim(), 1)
        return [fn(x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1), 1).reshape(x.shape)]

    return run


OUTPUTS_KEY = "__outputs__"  # how many outputs a node has, put among its attributes for Split
OPSET_KEY = "__opset__"  # the graph's opset, put among a node's attributes by the ops that need it
OPS["Softmax"] = _softmax(torch.softmax)
OPS["LogSoftmax"] = _softmax(torch.log_softmax)
OPS["Transpose"] = lambda i, a: [
    i[0].permute(*_ints(a["perm"])) if "perm" in a else i[0].permute(*reversed(range(i[0].dim())))
]
OPS["Concat"] = lambda i, a: [torch.cat([t for t in i if t is not None], int(a["axis"]))]
OPS["Shape"] = lambda i, a: [torch.tensor(i[0].shape[int(a.get("start", 0)) : a.get("end")], dtype=torch.int64)]


@op("Gemm")
def _gemm(i, a):
    A, B = i[0], i[1]
    if a.get("transA", 0):
        A = A.t()
    if a.get("transB", 0):
        B = B.t()
    y = float(a.get("alpha", 1.0)) * (A @ B)
    if len(i) > 2 and i[2] is not None:
        y = y + float(a.get("beta", 1.0)) * i[2]
    return [y]


@op("Flatten")
def _flatten(i, a):
    x, axis = i[0], int(a.get("axis", 1))
    axis = axis % x.dim() if x.dim() else 0
    return [x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)]


@op("Reshape")
def _reshape(i, a):
    x, shape = i[0], _ints(i[1])
    if not int(a.get("allowzero", 0)):
        shape = [x.shape[d] if s == 0 else s for d, s in enumerate(shape)]
    return [x.reshape(shape)]


def _axes(i, a, pos: int = 1) -> list[int] | None:
    if len(i) > pos and i[pos] is not None:
        return _ints(i[pos])
    return _ints(a["axes"]) if "axes" in a else None


@op("Squeeze")
def _squeeze(i, a):
    axes = _axes(i, a)
    x = i[0]
    if axes is None:
        return [x.squeeze()]
    for ax in sorted((ax % x.dim() for ax in axes), reverse=True):
        x = x.squeeze(ax)
    return [x]


@op("Unsqueeze")
def _unsqueeze(i, a):
    x = i[0]
    axes = _axes(i, a)
    rank = x.dim() + len(axes)
    for ax in sorted(ax % rank for ax in axes):
        x = x.unsqueeze(ax)
    return [x]


@op("Gather")
def _gather(i, a):
    x, idx = i[0], i[1].long()
    axis = int(a.get("axis", 0)) % max(x.dim(), 1)
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = torch.index_select(x, axis, idx.flatten())
    return [out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :]))]  # a scalar index drops the axis


@op("Slice")
def _slice(i, a):
    x = i[0]
    if len(i) > 1:
        starts, ends = _ints(i[1]), _ints(i[2])
        axes = _ints(i[3]) if len(i) > 3 and i[3] is not None else list(range(len(starts)))
        steps = _ints(i[4]) if len(i) > 4 and i[4] is not None else [1] * len(starts)
    else:
        starts, ends = _ints(a["starts"]), _ints(a["ends"])
        axes = _ints(a.get("axes", list(range(len(starts)))))
        steps = [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps, strict=True):
        if st <= 0:
            raise NotImplementedError("Slice with a negative step")
        n = x.shape[ax]
        index[ax % x.dim()] = slice(max(min(s, n), -n), max(min(e, n), -n - 1), st)
    return [x[tuple(index)]]


@op("Pad")
def _pad(i, a):
    x = i[0]
    pads = _ints(i[1]) if len(i) > 1 else _ints(a["pads"])
    value = float(i[2]) if len(i) > 2 and i[2] is not None else float(a.get("value", 0.0))
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    k = len(pads) // 2
    torch_pads = []
    for d in reversed(range(k)):
        torch_pads += [pads[d], pads[d + k]]
    while torch_pads and torch_pads[-2:] == [0, 0] and len(torch_pads) > 2 * (x.dim() - 2):
        torch_pads = torch_pads[:-2]
    return [F.pad(x, torch_pads, mode=mode, value=value) if mode == "constant" else F.pad(x, torch_pads, mode=mode)]


@op("Clip")
def _clip(i, a):
    lo = i[1] if len(i) > 1 and i[1] is not None else a.get("min")
    hi = i[2] if len(i) > 2 and i[2] is not None else a.get("max")
    lo, hi = (v.detach() if isinstance(v, Tensor) else v for v in (lo, hi))
    return [torch.clamp(i[0], None if lo is None else float(lo), None if hi is None else float(hi))]


def _reduce(fn):
    def run(i, a):
        axes = _axes(i, a)
        keep = bool(a.get("keepdims", 1))
        if axes is None or len(axes) == 0:
            if a.get("noop_with_empty_axes", 0):
                return [i[0]]
            axes = list(range(i[0].dim()))
        return [fn(i[0], dim=tuple(axes), keepdim=keep)]

    return run


OPS["ReduceMean"] = _reduce(torch.mean)
OPS["ReduceSum"] = _reduce(torch.sum)
OPS["ReduceMax"] = _reduce(torch.amax)


@op("Cast")
def _cast(i, a):
    from onnx import helper

    np_dtype = helper.tensor_dtype_to_np_dtype(int(a["to"]))
    return [i[0].to(torch.from_numpy(np.zeros(1, dtype=np_dtype)).dtype)]


@op("ConstantOfShape")
def _const_of_shape(i, a):
    value = a.get("value")
    fill = torch.as_tensor(value).flatten()[0] if value is not None else torch.tensor(0.0)
    return [torch.full(_ints(i[0]), fill.item(), dtype=fill.dtype)]


@op("Expand")
def _expand(i, a):
    shape = _ints(i[1])
    x = i[0]
    target = torch.broadcast_shapes(tuple(x.shape), tuple(shape))
    return [x.expand(target)]


# Float inputs that are not weights: BatchNorm's running statistics, and the bounds, shapes, pads,
# exponents and axes some exporters store as float initializers. They stay fixed in the repair.
_FIXED_INPUTS = {
    "BatchNormalization": (3, 4),
    "Clip": (1, 2),
    "Pad": (1, 2, 3),
    "Pow": (1,),
    "Reshape": (1,),
    "Expand": (1,),
    "Slice": (1, 2, 3, 4),
    "Dropout": (1, 2),
    "Resize": (1, 2, 3),
    "Upsample": (1,),
}


class GraphError(ValueError):
    """The graph cannot be run as it is written (an input no node produces, a cycle)."""


class NodeFailure(RuntimeError):
    """A node failed while the graph ran: names the node, its operator and the cause."""


def _constant(attrs: dict) -> Tensor:
    """A Constant node's value, whichever attribute holds it."""
    if "value" in attrs:
        return attrs["value"]
    if "value_float" in attrs:
        return torch.tensor(float(attrs["value_float"]))
    if "value_int" in attrs:
        return torch.tensor(int(attrs["value_int"]))
    if "value_floats" in attrs:
        return torch.tensor([float(v) for v in attrs["value_floats"]], dtype=torch.float32)
    if "value_ints" in attrs:
        return torch.tensor([int(v) for v in attrs["value_ints"]], dtype=torch.int64)
    raise GraphError(f"a Constant node holds {', '.join(attrs) or 'nothing'}: only tensors and numbers are supported")


def _topological(nodes: list, available: set[str]) -> list:
    """The nodes in an order where each runs after the nodes its inputs come from (onnxruntime sorts
    them too; the ONNX standard asks exporters to); an input nothing produces is an error."""
    produced_by = {out: k for k, node in enumerate(nodes) for out in node[2] if out}
    for k, node in enumerate(nodes):
        for name in node[1]:
            if name and name not in available and name not in produced_by:
                raise GraphError(f"node {k} ({node[0]}) reads {name!r}, which no node, input or initializer provides")
    import heapq

    needs = [{produced_by[n] for n in node[1] if n and n not in available} for node in nodes]
    users: dict[int, list[int]] = {}
    for k, deps in enumerate(needs):
        for j in deps:
            users.setdefault(j, []).append(k)
    waiting = [len(deps) for deps in needs]
    ready = [k for k, n in enumerate(waiting) if n == 0]  # a heap: file order wherever it is valid
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(nodes[k])
        for u in users.get(k, ()):
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) < len(nodes):
        stuck = next(k for k, n in enumerate(waiting) if n > 0)
        raise GraphError(f"the graph has a cycle through node {stuck} ({nodes[stuck][0]})")
    return order


def _attrs(node) -> dict:
    from onnx import helper, numpy_helper

    out = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if attr.type == attr.TENSOR:
            value = torch.from_numpy(np.array(numpy_helper.to_array(value)))
        out[attr.name] = value
    return out


class OnnxGraphModule(nn.Module):
    """Executes an ONNX graph with torch ops; float weights are trainable parameters: the float
    initializers, and the float tensors of Constant nodes (where older converters keep weights),
    except the inputs in _FIXED_INPUTS."""

    def __init__(self, model) -> None:
        from onnx import numpy_helper

        super().__init__()
        self.proto = model
        graph = model.graph
        init_names = {t.name for t in graph.initializer}
        fixed = set()
        for node in graph.node:
            for pos in _FIXED_INPUTS.get(node.op_type, ()):
                if pos < len(node.input):
                    fixed.add(node.input[pos])
        self.param_keys: dict[str, str] = {}
        self.params = nn.ParameterDict()
        for i, t in enumerate(graph.initializer):
            arr = torch.from_numpy(np.array(numpy_helper.to_array(t)))
            key = f"p{i}"
            if arr.is_floating_point() and t.name not in fixed:
                self.params[key] = nn.Parameter(arr.float() if arr.dtype == torch.float64 else arr)
            else:
                self.register_buffer(key, arr)
            self.param_keys[t.name] = key
        opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=13)
        nodes = []
        self.constant_nodes: dict[int, str] = {}  # node index -> parameter key, written back by updated_proto
        for k, n in enumerate(graph.node):
            attrs = _attrs(n)
            if n.op_type in ("Softmax", "LogSoftmax"):
                attrs[OPSET_KEY] = opset
            if n.op_type == "Split":
                attrs[OUTPUTS_KEY] = len(n.output)
            if n.op_type == "Constant":
                value = _constant(attrs)
                key = f"c{k}"
                if value.is_floating_point() and value.numel() > 1 and n.output[0] not in fixed:
                    self.params[key] = nn.Parameter(value.float() if value.dtype == torch.float64 else value)
                    self.constant_nodes[k] = key
                else:
                    self.register_buffer(key, value)
                self.param_keys[n.output[0]] = key
                continue
            nodes.append((n.op_type, list(n.input), list(n.output), attrs))
        self.inputs = [v.name for v in graph.input if v.name not in init_names]
        self.nodes = _topological(nodes, set(self.inputs) | set(self.param_keys))
        self.outputs = [v.name for v in graph.output]
        self.channels_last = False
        self.fixed_batch: int | None = None  # the graph's batch size, when the export fixed one
        # the input of a Softmax that ends the graph (the logits), and whether forward returns it
        self.softmax_input: str | None = _final_softmax_input(graph)
        self.output_logits = False

    def forward(self, x: Tensor) -> Tensor:
        """The graph on ``x``; a graph exported with a fixed batch size runs on chunks of that size
        (``fixed_batches``; eval mode: images do not interact)."""
        if self.fixed_batch is None or len(x) == self.fixed_batch:
            return self._run(x)
        return torch.cat([self._run(x[idx])[:n] for idx, n in fixed_batches(len(x), self.fixed_batch)])

    def _value(self, name: str) -> Tensor:
        key = self.param_keys[name]
        return self.params[key] if key in self.params else getattr(self, key)

    def _run(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.permute(0, 2, 3, 1)
        env: dict[str, Tensor | None] = {self.inputs[0]: x, "": None}
        for k, (op_type, ins, outs, attrs) in enumerate(self.nodes):
            args = [env[n] if n in env else self._value(n) for n in ins]
            try:
                results = OPS[op_type](args, attrs)
            except Exception as exc:
                raise NodeFailure(f"node {k} ({op_type} -> {outs[0]}) failed: {type(exc).__name__}: {exc}") from exc
            for name, value in zip(outs, results, strict=False):
                env[name] = value
        return env[self.softmax_input if self.output_logits else self.outputs[0]]

    def updated_proto(self):
        """A copy of the original ModelProto with every trainable initializer and Constant replaced."""
        from onnx import helper, numpy_helper

        model = type(self.proto)()
        model.CopyFrom(self.proto)
        for t in model.graph.initializer:
            key = self.param_keys.get(t.name)
            if key in self.params:
                arr = self.params[key].detach().cpu().numpy()
                new = numpy_helper.from_array(arr.astype(numpy_helper.to_array(t).dtype), t.name)
                t.CopyFrom(new)
        for k, key in self.constant_nodes.items():
            node = model.graph.node[k]
            old = next(a for a in node.attribute if a.name in ("value", "value_floats"))
            dtype = numpy_helper.to_array(old.t).dtype if old.name == "value" else np.float32
            arr = self.params[key].detach().cpu().numpy().astype(dtype)
            new = helper.make_attribute(old.name, numpy_helper.from_array(arr) if old.name == "value" else arr.tolist())
            old.CopyFrom(new)
        return model


def _final_softmax_input(graph) -> str | None:
    """The input of the Softmax over the last axis that produces the graph's first output (through
    Identity nodes), or None. Its input is the class logits: ibau repairs and probes on them, and the
    graph it writes back keeps the Softmax."""
    producer = {out: node for node in graph.node for out in node.output}
    node = producer.get(graph.output[0].name)
    while node is not None and node.op_type == "Identity":
        node = producer.get(node.input[0])
    if node is None or node.op_type != "Softmax":
        return None
    axis = int(_attrs(node).get("axis", -1))
    return node.input[0] if axis in (-1, 1) else None  # 1: the class axis of a 2-D output (any opset)


def unsupported_ops(model) -> list[str]:
    return sorted({n.op_type for n in model.graph.node if n.op_type not in OPS and n.op_type != "Constant"})


# the operators of onnx_ops_more register themselves in OPS (and their fixed inputs) when imported
from . import onnx_ops_more  # noqa: E402, F401
