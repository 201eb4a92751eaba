"""ONNX in, ONNX out: torch's exporters (opset 17 legacy, opset 18+ default), parity with
onnxruntime, the repaired file run by plain onnxruntime, graph and names preserved."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_cli_errors import assert_one_line_error, invoke

from conftest import run_cli, sanitize_with_trigger
from ibau_cli.demo import TARGET, add_badnets_trigger


def _export(module, path, *, dynamo: bool, channels_last: bool = False, fixed_batch: int | None = None):
    module = module.eval()
    if channels_last:
        inner = module

        class NHWC(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                return self.inner(x.permute(0, 3, 1, 2))

        module = NHWC().eval()
    b = fixed_batch or 2
    x = torch.rand(b, 32, 32, 3) if channels_last else torch.rand(b, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(
                module,
                (x,),
                str(path),
                dynamo=True,
                input_names=["image"],
                output_names=["scores"],
                dynamic_shapes=None if fixed_batch else {"x": {0: torch.export.Dim("batch")}},
            )
        else:
            torch.onnx.export(
                module,
                (x,),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["image"],
                output_names=["scores"],
                dynamic_axes=None if fixed_batch else {"image": {0: "batch"}, "scores": {0: "batch"}},
            )
    return path


def _ort_figures(path, x, y, channels_last=False):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def predict(batch):
        arr = batch.numpy().astype(np.float32)
        if channels_last:
            arr = np.ascontiguousarray(arr.transpose(0, 2, 3, 1))
        return sess.run(None, {name: arr})[0].argmax(1)

    acc = float((predict(x) == y.numpy()).mean())
    keep = y != TARGET
    asr = float((predict(add_badnets_trigger(x[keep])) == TARGET).mean())
    return acc, asr


@pytest.mark.parametrize("dynamo", [True, False], ids=["opset18plus", "opset17"])
def test_onnx_sanitize_round_trip(backdoored, tmp_path, dynamo):
    src = _export(backdoored["module"], tmp_path / "model.onnx", dynamo=dynamo)
    out = tmp_path / "fixed.onnx"
    res = run_cli(*sanitize_with_trigger(backdoored, src, "clean500", out, "--json", "--quiet"))
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["input"]["format"] == "onnx" and report["output"]["format"] == "onnx"
    assert report["parity_before"]["max_abs_logit_diff"] < 1e-4
    assert report["parity_before"]["argmax_agreement"] == 1.0
    assert report["verification"]["runtime"] == "onnxruntime"

    acc0, asr0 = _ort_figures(src, backdoored["x_eval"], backdoored["y_eval"])
    acc1, asr1 = _ort_figures(out, backdoored["x_eval"], backdoored["y_eval"])
    assert asr0 > 0.9 and asr1 < 0.2 and acc0 - acc1 < 0.05, (acc0, acc1, asr0, asr1)

    a, b = onnx.load(str(src)), onnx.load(str(out))
    assert [i.name for i in a.graph.input] == [i.name for i in b.graph.input] == ["image"] or dynamo
    assert [o.name for o in a.graph.output] == [o.name for o in b.graph.output]
    assert list(a.opset_import) == list(b.opset_import)
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    batch_dim = b.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # dynamic batch axis kept
    meta = {p.key: p.value for p in b.metadata_props}
    assert meta["ibau.source_sha256"] == report["input"]["sha256"]


def test_onnx_exported_with_a_fixed_batch_size_is_repaired_in_chunks(backdoored, tmp_path, dynamo=True):
    """torch.onnx.export without dynamic axes fixes the batch (here 4; the default exporter also bakes
    it into a Reshape): ibau runs such a graph in chunks of that size (the last one padded), repairs
    it and writes it back with the same fixed input, which plain onnxruntime runs four at a time."""
    src = _export(backdoored["module"], tmp_path / "model.onnx", dynamo=dynamo, fixed_batch=4)
    assert onnx.load(str(src)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4
    out = tmp_path / "fixed.onnx"
    res = run_cli(*sanitize_with_trigger(backdoored, src, "clean100", out, "--json", "--quiet"))
    report = json.loads(res.stdout)
    assert res.returncode == 0, report["gates"]
    assert report["parity_before"]["argmax_agreement"] == 1.0 and report["verification"]["argmax_agreement"] == 1.0
    assert any("fixed batch of 4" in note for note in report["model"]["notes"]), report["model"]["notes"]
    assert report["after"]["asr"]["value"] < report["before"]["asr"]["value"]
    assert onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = backdoored["x_eval"][:8].numpy().astype(np.float32)
    pred = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i : i + 4]})[0] for i in (0, 4)])
    assert pred.shape == (8, 10)


def test_onnx_zero_rounds_keeps_the_graph_bit_for_bit(backdoored, tmp_path):
    src = _export(backdoored["module"], tmp_path / "model.onnx", dynamo=False)
    out = tmp_path / "same.onnx"
    code, _, err = invoke(
        "sanitize", src, "--clean", backdoored["clean100"], "--out", out, "--rounds", "0", "--quiet", "--no-probes"
    )
    assert code == 0, err
    assert onnx.load(str(src)).graph.SerializeToString() == onnx.load(str(out)).graph.SerializeToString()


def test_onnx_channels_last_graph(backdoored, tmp_path):
    src = _export(backdoored["module"], tmp_path / "nhwc.onnx", dynamo=False, channels_last=True)
    code, stdout, err = invoke(
        "sanitize",
        src,
        "--clean",
        backdoored["clean100"],
        "--out",
        tmp_path / "o.onnx",
        "--rounds",
        "1",
        "--json",
        "--quiet",
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert any("NHWC" in n for n in report["model"]["notes"])
    assert report["parity_before"]["max_abs_logit_diff"] < 1e-4


def test_unsupported_operator_is_named(backdoored, tmp_path):
    from onnx import TensorProto, helper

    node = helper.make_node("LpNormalization", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3, 32, 32])],
    )
    path = tmp_path / "odd.onnx"
    onnx.save(helper.make_model(graph), str(path))
    code, _, err = invoke("sanitize", path, "--clean", backdoored["clean100"])
    assert_one_line_error(code, err, 2, "unsupported ONNX operator", "LpNormalization")


def test_onnx_output_from_other_format_is_a_clear_error(backdoored, tmp_path):
    code, _, err = invoke(
        "sanitize", backdoored["model"], "--clean", backdoored["clean100"], "--out", tmp_path / "x.onnx"
    )
    assert_one_line_error(code, err, 2, "cannot write onnx from a safetensors model")


def test_onnx_graph_ending_in_a_softmax_is_repaired_on_its_logits(backdoored, tmp_path):
    """Keras (via tf2onnx) and many exporters end a classifier's graph in a Softmax. sanitize refuses
    probability outputs elsewhere (no gradient at exact zeros); here it repairs on the Softmax's
    input and writes the graph back with the Softmax, so the file still outputs probabilities."""
    import copy

    from test_formats import _SoftmaxOutput

    src = _export(_SoftmaxOutput(copy.deepcopy(backdoored["module"])), tmp_path / "softmax.onnx", dynamo=False)
    assert onnx.load(str(src)).graph.node[-1].op_type == "Softmax"
    out = tmp_path / "fixed.onnx"
    res = run_cli(*sanitize_with_trigger(backdoored, src, "clean500", out, "--json", "--quiet"))
    report = json.loads(res.stdout)
    assert res.returncode == 0, (res.stderr, report.get("gates"))
    assert any("ends in a Softmax" in w for w in report["warnings"]), report["warnings"]
    assert any("ends in a Softmax" in n for n in report["model"]["notes"]), report["model"]["notes"]
    assert report["verification"]["runtime"] == "onnxruntime" and report["verification"]["argmax_agreement"] == 1.0
    acc0, asr0 = _ort_figures(src, backdoored["x_eval"], backdoored["y_eval"])
    acc1, asr1 = _ort_figures(out, backdoored["x_eval"], backdoored["y_eval"])
    assert asr0 > 0.9 and asr1 < 0.2 and acc0 - acc1 < 0.05, (acc0, acc1, asr0, asr1)
    written = onnx.load(str(out))
    assert written.graph.node[-1].op_type == "Softmax"
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    probs = sess.run(None, {"image": backdoored["x_eval"][:16].numpy().astype(np.float32)})[0]
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5) and probs.min() >= 0  # still probabilities


def _as_other_exporters_write_it(path, out_path):
    """torch's opset-17 graph rewritten the way other converters write theirs: "same" padding as
    auto_pad=SAME_UPPER, the first convolution's weight in a Constant node (older keras2onnx), and
    the nodes in reverse file order (onnxruntime sorts them; ONNX asks exporters not to rely on it)."""
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    for node in graph.node:
        if node.op_type == "Conv":
            pads = next(a for a in node.attribute if a.name == "pads")
            assert list(pads.ints) == [1, 1, 1, 1]
            node.attribute.remove(pads)
            node.attribute.append(helper.make_attribute("auto_pad", "SAME_UPPER"))
    first_conv = next(n for n in graph.node if n.op_type == "Conv")
    weight = next(t for t in graph.initializer if t.name == first_conv.input[1])
    graph.initializer.remove(weight)
    const = helper.make_node(
        "Constant", [], [weight.name], value=numpy_helper.from_array(numpy_helper.to_array(weight))
    )
    nodes = [const, *graph.node]
    del graph.node[:]
    graph.node.extend(reversed(nodes))
    onnx.save(model, str(out_path))
    return out_path


def test_onnx_from_other_exporters_same_padding_constant_weights_unsorted_nodes(backdoored, tmp_path):
    """A graph that onnxruntime runs, written unlike torch's: 0.3.6 refused it (auto_pad SAME_* not
    implemented, nodes run in file order) and would have kept weights held in Constant nodes fixed."""
    src = _export(backdoored["module"], tmp_path / "torch.onnx", dynamo=False)
    other = _as_other_exporters_write_it(src, tmp_path / "other.onnx")
    out = tmp_path / "fixed.onnx"
    res = run_cli(*sanitize_with_trigger(backdoored, other, "clean500", out, "--json", "--quiet"))
    report = json.loads(res.stdout)
    assert res.returncode == 0, (res.stderr, report.get("gates"))
    assert report["parity_before"]["max_abs_logit_diff"] < 1e-4
    acc0, asr0 = _ort_figures(other, backdoored["x_eval"], backdoored["y_eval"])
    acc1, asr1 = _ort_figures(out, backdoored["x_eval"], backdoored["y_eval"])
    assert asr0 > 0.9 and asr1 < 0.2 and acc0 - acc1 < 0.05, (acc0, acc1, asr0, asr1)
    a, b = onnx.load(str(other)), onnx.load(str(out))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]  # the file's order kept
    const_a, const_b = (next(n for n in m.graph.node if n.op_type == "Constant") for m in (a, b))
    assert const_a.attribute[0].t.raw_data != const_b.attribute[0].t.raw_data  # that weight was repaired too


def _run_both(nodes, inits, x, opset):
    """A hand-built graph run by onnxruntime and by ibau's executor, for the same input."""
    from onnx import TensorProto, helper

    from ibau_cli.formats.onnx_graph import OnnxGraphModule

    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        ours = OnnxGraphModule(model)(torch.from_numpy(x)).numpy()
    return ref, ours


@pytest.mark.parametrize("op_type", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("opset", [11, 13])
def test_onnx_softmax_follows_its_opset(op_type, opset):
    """Before opset 13 a Softmax works on the tensor flattened to 2-D at its axis (default 1); from 13
    along the axis (default -1). On a 4-D tensor the two differ: 0.3.6 applied the second to both."""
    from onnx import helper

    x = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
    for attrs in ({}, {"axis": 1}, {"axis": 2}):
        ref, ours = _run_both([helper.make_node(op_type, ["x"], ["y"], **attrs)], [], x, opset)
        assert np.allclose(ref, ours, atol=1e-5), (attrs, np.abs(ref - ours).max())


def test_onnx_dynamic_flatten_and_list_constants():
    """The flatten torch's legacy exporter and TensorFlow converters write: Shape -> Gather with a
    scalar index -> Unsqueeze -> Concat with a Constant of value_ints -> Reshape (0.3.6: refused)."""
    from onnx import helper, numpy_helper

    x = np.random.default_rng(1).normal(size=(3, 2, 4, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, dtype=np.int64))),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
        helper.make_node("Constant", [], ["rest"], value_ints=[-1]),
        helper.make_node("Concat", ["n1", "rest"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
    ]
    axes = numpy_helper.from_array(np.array([0], dtype=np.int64), "axes")
    ref, ours = _run_both(nodes, [axes], x, 13)
    assert ours.shape == (3, 32) and np.array_equal(ref, ours)


def test_onnx_graph_reading_a_missing_tensor_is_a_clear_error(backdoored, tmp_path):
    from onnx import helper

    src = _export(backdoored["module"], tmp_path / "model.onnx", dynamo=False)
    model = onnx.load(str(src))
    last = model.graph.node[-1]
    model.graph.node.append(helper.make_node("Add", [last.output[0], "ghost_bias"], ["ghosted"]))
    model.graph.output[0].name = "ghosted"
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    code, _, err = invoke("scan", broken, "--clean", backdoored["clean100"])
    assert_one_line_error(code, err, 2, "broken.onnx", "'ghost_bias'", "re-export")


def test_a_node_that_fails_on_the_input_size_is_named(backdoored, tmp_path):
    """A graph with free height and width whose flatten is written for 32x32: on 28x28 the Reshape
    cannot fill it. The error names the node, its operator and its output (0.3.6 blamed the input
    size alone), and says how to set the size."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([-1, 4 * 32 * 32], dtype=np.int64), "flat"),
        numpy_helper.from_array(rng.normal(size=(4 * 32 * 32, 10)).astype(np.float32) * 0.01, "fc"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Reshape", ["r", "flat"], ["f"]),
        helper.make_node("MatMul", ["f", "fc"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 10])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    path = tmp_path / "fixed_flatten.onnx"
    onnx.save(model, str(path))
    code, _, err = invoke("scan", path, "--clean", backdoored["clean100"], "--input-size", "28x28")
    assert_one_line_error(code, err, 2, "fixed_flatten.onnx", "3x28x28 input", "(Reshape -> f) failed", "--input-size")


def test_file_names_that_are_not_utf8_load_and_write_in_every_format(backdoored, tmp_path):
    """A Latin-1 file name ('modèle' as one byte 0xe8): torch's, safetensors' and onnxruntime's C++
    file handling takes UTF-8 names only. 0.3.9 refused the safetensors input as "not a readable
    safetensors file" and failed writing TorchScript after the whole repair (exit 3)."""
    import os
    import shutil

    def latin1(name: str) -> str:
        return os.fsdecode(os.fsencode(str(tmp_path)) + b"/" + name.encode("latin-1"))

    model = latin1("modèle.safetensors")
    shutil.copy(backdoored["model"], model)
    onnx_model = latin1("modèle.onnx")
    shutil.copy(_export(backdoored["module"], tmp_path / "plain.onnx", dynamo=False), onnx_model)
    # the same graph with its weights in an external-data file beside it; the command runs from another
    # directory (0.4.0 handed onnxruntime the bytes, and it looked for the data in the working directory)
    external = latin1("modèle-externe.onnx")
    onnx.save_model(onnx.load(onnx_model), external, save_as_external_data=True, location="poids.bin", size_threshold=0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for src, out in [
        (model, latin1("réparé.ts")),
        (model, latin1("réparé.pt2")),
        (onnx_model, latin1("réparé.onnx")),
        (external, latin1("réparé-externe.onnx")),
    ]:
        args = ["sanitize", src, "--clean", backdoored["clean100"], "--out", out, "--rounds", "0", "-q"]
        res = run_cli(*args, cwd=elsewhere)
        assert res.returncode == 0, (out, res.stderr)
        if not out.endswith(".onnx"):  # the written file loads back (an ONNX one is reloaded to verify it)
            again = [
                "sanitize",
                out,
                "--clean",
                backdoored["clean100"],
                "--rounds",
                "0",
                "--out",
                tmp_path / ("x" + out[-4:]),
            ]
            res = run_cli(*again, "-q")
            assert res.returncode == 0, (out, res.stderr)
