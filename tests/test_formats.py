"""TorchScript and PyTorch-checkpoint formats end to end, and the malicious-pickle refusal."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from test_cli_errors import assert_one_line_error, invoke

from conftest import independent_figures, run_cli, sanitize_with_trigger
from ibau_cli.archs import ARCHS
from ibau_cli.formats import detect_format, load_model
from ibau_cli.formats.exported_format import FixedMode  # exported modules refuse .eval()


def _jit(module, traced: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = module.eval()
        return torch.jit.trace(module, torch.rand(2, 3, 32, 32)) if traced else torch.jit.script(module)


def test_torchscript_sanitize_round_trip(backdoored, tmp_path):
    src = tmp_path / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(_jit(backdoored["module"], traced=True), str(src))
    assert detect_format(src).name == "torchscript"
    out = tmp_path / "fixed.pt"
    res = run_cli(*sanitize_with_trigger(backdoored, src, "clean100", out, "--json", "--quiet"))
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["output"]["format"] == "torchscript" and report["model"]["num_classes"] == 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = torch.jit.load(str(out))  # a plain runtime, no ibau
    acc0, asr0 = independent_figures(backdoored["module"], backdoored["x_eval"], backdoored["y_eval"])
    acc1, asr1 = independent_figures(plain, backdoored["x_eval"], backdoored["y_eval"])
    assert asr0 > 0.9 and asr1 < 0.2 and acc0 - acc1 < 0.05, (acc0, acc1, asr0, asr1)


class _SoftmaxOutput(torch.nn.Module):
    """A third party's classifier that ends in a softmax: it outputs probabilities, not logits."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).softmax(dim=1)


def test_a_model_that_outputs_probabilities_is_refused_by_sanitize_and_scanned(backdoored, tmp_path):
    """Cross-entropy on probabilities: I-BAU's adversarial images drive the true class's probability
    to exactly 0, where the softmax passes no gradient (measured: outer gradient norm 5e-10 against
    0.08 to 22 for the same model without the softmax). 0.3.4 ran, changed nothing and left the
    ASR at 100 %; now sanitize refuses before any work, and scan reads the model as it is."""
    import copy

    src = tmp_path / "softmax.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(_jit(_SoftmaxOutput(copy.deepcopy(backdoored["module"])), traced=True), str(src))
    out = tmp_path / "fixed.pt"
    code, _, err = invoke("sanitize", src, "--clean", backdoored["clean100"], "--out", out)
    assert_one_line_error(code, err, 2, "outputs probabilities (a softmax)", "without its final softmax")
    assert not out.exists()
    res = run_cli("scan", src, "--clean", backdoored["clean100"], "--trigger", backdoored["trigger"],
                  "--target", "0", "--json", "-q", "--set", "probes.budget_steps=300", probes=True)  # fmt: skip
    assert res.returncode == 1, res.stderr  # the true trigger's ASR is past the gate
    report = json.loads(res.stdout)
    assert report["before"]["asr"]["value"] > 0.9
    assert any("probes optimise on their logarithm" in w for w in report["warnings"]), report["warnings"]
    assert report["probes"]["before"]["verdict"] == "suspected", report["probes"]["before"]["evidence"]


def test_output_kind_tells_logits_probabilities_and_scores_apart():
    from ibau_cli.preprocess import output_kind

    z = torch.randn(64, 10) * 3
    assert output_kind(z) == "logits"
    assert output_kind(z.softmax(1)) == "probabilities"
    assert output_kind(z.sigmoid()) == "scores"
    assert output_kind(z.log_softmax(1)) == "logits"  # log-probabilities are logits up to a constant


def test_scripted_module_trains_through_double_backward(backdoored, tmp_path):
    from ibau_cli.config import UnlearnConfig
    from ibau_cli.unlearn import unlearn

    scripted = _jit(ARCHS.get("small-cnn").build(10), traced=False)
    scripted.load_state_dict(backdoored["module"].state_dict())
    before = [p.detach().clone() for p in scripted.parameters()]
    x, y = backdoored["x_eval"][:64], backdoored["y_eval"][:64]
    _, log = unlearn(scripted, x, y, UnlearnConfig(rounds=1, min_steps_per_round=2, inner_steps=2), seed=0)
    assert log.rounds[0].neumann_terms_mean >= 1
    assert any(not torch.equal(a, b) for a, b in zip(before, scripted.parameters(), strict=True))


def test_checkpoint_nested_state_dict_with_module_prefix(backdoored, tmp_path):
    sd = {f"module.{k}": v for k, v in backdoored["module"].state_dict().items()}
    src = tmp_path / "ckpt.pth"
    torch.save({"epoch": 50, "model": sd, "best_acc": 0.9}, src)
    loaded = load_model(src, arch="small-cnn")
    assert loaded.fmt == "checkpoint" and loaded.num_classes == 10
    assert any("key 'model'" in n for n in loaded.notes)
    out = tmp_path / "fixed.pth"
    code, stdout, err = invoke(
        *sanitize_with_trigger(backdoored, src, "clean100", out, "--arch", "small-cnn", "--json", "--quiet")
    )
    assert code == 0, err
    # The output is a plain state dict that torch's safe loader reads, with ibau's metadata beside it.
    obj = torch.load(out, weights_only=True)
    model = ARCHS.get("small-cnn").build(10)
    model.load_state_dict(obj["state_dict"])
    acc1, asr1 = independent_figures(model, backdoored["x_eval"], backdoored["y_eval"])
    assert asr1 < 0.2 and obj["ibau_metadata"]["ibau.arch"] == "small-cnn"
    # ... and ibau reloads it with no flags.
    assert load_model(out).arch == "small-cnn"


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_never_runs(backdoored, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": backdoored["module"].state_dict(), "extra": _Payload(marker)}, evil)
    legacy = tmp_path / "evil_legacy.pth"
    with open(legacy, "wb") as fh:
        pickle.dump({"net": _Payload(marker)}, fh, protocol=2)
    raw = tmp_path / "evil.pkl"  # a plain pickle, protocol 4, named as one
    raw.write_bytes(pickle.dumps(_Payload(marker), protocol=4))
    for path in (evil, legacy, raw):
        code, _, err = invoke("sanitize", path, "--clean", backdoored["clean100"], "--arch", "small-cnn")
        assert_one_line_error(code, err, 2, "refused", "arbitrary code")
        assert not marker.exists()
        # what the safe loader objected to, never torch's advice to load the file unsafely
        assert "weights_only" not in err and "Re-running" not in err and "\x1b" not in err, err
    code, _, err = invoke("sanitize", evil, "--clean", backdoored["clean100"], "--arch", "small-cnn")
    assert "posix.system" in err or "os.system" in err, err
    code, _, err = invoke("inspect", raw)
    assert_one_line_error(code, err, 2, "a plain Python pickle, not a torch.save file")


def test_extension_disagreeing_with_content(backdoored, tmp_path):
    wrong = tmp_path / "model.onnx"
    wrong.write_bytes(backdoored["model"].read_bytes())
    code, _, err = invoke("sanitize", wrong, "--clean", backdoored["clean100"])
    assert_one_line_error(code, err, 2, "extension", "safetensors")


def test_safetensors_to_checkpoint_conversion(backdoored, tmp_path):
    out = tmp_path / "fixed.pt"
    code, stdout, err = invoke(
        "sanitize",
        backdoored["model"],
        "--clean",
        backdoored["clean100"],
        "--out",
        out,
        "--rounds",
        "1",
        "--json",
        "--quiet",
    )
    assert code == 0, err
    assert json.loads(stdout)["output"]["format"] == "checkpoint"


def test_inspect_reads_safetensors_header_only(backdoored, tmp_path):
    code, stdout, err = invoke("inspect", backdoored["model"], "--json")
    assert code == 0, err
    info = json.loads(stdout)
    assert info["format"] == "safetensors" and info["architecture"] == "small-cnn"
    assert info["num_classes"] == 10 and info["input_shape"] == [3, 32, 32]
    assert info["num_classes_source"] == "metadata"
    n_params = sum(v.numel() for v in backdoored["module"].state_dict().values())
    assert info["parameters"] == n_params
    code, text, _ = invoke("inspect", backdoored["model"])  # the text output names the tensors too
    assert code == 0 and "tensor features.0.weight [16, 3, 3, 3]" in " ".join(text.split()), text
    assert f"{info['tensors'] - 12} more" in text
    code, _, err = invoke("inspect", tmp_path / "missing.safetensors")
    assert_one_line_error(code, err, 2, "not found")


def test_inspect_of_torchscript_without_metadata_names_the_class_count_and_its_source(backdoored, tmp_path):
    src = tmp_path / "bare.torchscript.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(_jit(backdoored["module"], traced=True), str(src))  # no ibau metadata in it
    code, stdout, err = invoke("inspect", src, "--json")
    assert code == 0, err
    info = json.loads(stdout)
    assert info["format"] == "torchscript" and info["metadata"] == {}
    assert info["num_classes"] == 10 and info["num_classes_source"].startswith("a guess: the last 2-D weight")


def test_inspect_refuses_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"extra": _Payload(marker)}, evil)
    code, _, err = invoke("inspect", evil)
    assert_one_line_error(code, err, 2, "refused")
    assert not marker.exists()


def test_torch_export_program_round_trip(backdoored, tmp_path):
    src = tmp_path / "model.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(
            backdoored["module"].eval(),
            (torch.rand(2, 3, 32, 32),),
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        )
        torch.export.save(program, str(src))
    assert detect_format(src).name == "torch-export"
    out = tmp_path / "fixed.pt2"
    code, stdout, err = invoke(*sanitize_with_trigger(backdoored, src, "clean100", out, "--json", "--quiet"))
    assert code == 0, err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = torch.export.load(str(out)).module()  # plain torch, no ibau
    acc1, asr1 = independent_figures(FixedMode(plain), backdoored["x_eval"], backdoored["y_eval"])
    assert asr1 < 0.2, asr1
    # converting to .pt2 from the command line, quietly: nothing on stderr (torch's exporter used to
    # warn about the temporary file's name), no temporary file left
    conv = tmp_path / "conv" / "converted.pt2"
    conv.parent.mkdir()
    res = run_cli(
        "sanitize", backdoored["model"], "--clean", backdoored["clean100"], "--out", conv, "--rounds", "1", "-q"
    )
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert [p.name for p in conv.parent.iterdir()] == ["converted.pt2"]


def test_conversions_that_cannot_reload_are_refused_before_any_work(backdoored, tmp_path):
    """A TorchScript graph has no architecture a state dict could be reloaded with: 0.3.4 ran the
    whole repair, then failed verification (exit 3). Now: exit 2 at once, nothing written."""
    from ibau_cli.formats import FORMATS

    src = tmp_path / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(_jit(backdoored["module"], traced=True), str(src))
    for out in (tmp_path / "fixed.safetensors", tmp_path / "fixed.pt2"):
        code, _, err = invoke("sanitize", src, "--clean", backdoored["clean100"], "--out", out)
        assert_one_line_error(code, err, 2, f"--out {out}", "from a torchscript model", "conversions:")
        assert not out.exists()
    allowed = {
        name: [src for src in FORMATS.names() if FORMATS.get(name).can_save_from(src)] for name in FORMATS.names()
    }
    assert allowed["onnx"] == ["onnx"]
    assert allowed["safetensors"] == allowed["checkpoint"] == ["checkpoint", "safetensors"]
    assert sorted(allowed["torchscript"]) == ["checkpoint", "safetensors", "torchscript"]
    assert sorted(allowed["torch-export"]) == ["checkpoint", "safetensors", "torch-export"]


class _TupleOutput(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.inner(x)
        return z, z.softmax(dim=1)


def test_a_model_returning_a_tuple_is_told_what_it_returns(backdoored, tmp_path):
    """0.3.4 said the model "does not run on a 3x32x32 input ('tuple' object has no attribute 'shape')"."""
    import copy

    src = tmp_path / "tuple.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(_jit(_TupleOutput(copy.deepcopy(backdoored["module"])), traced=True), str(src))
    code, _, err = invoke("scan", src, "--clean", backdoored["clean100"])
    assert_one_line_error(code, err, 2, "returns a tuple of 2 values", "one logits tensor of shape [batch, classes]")


class _BatchNormInTraining(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(3)
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.bn(x))


def test_a_graph_traced_in_training_mode_is_refused_before_the_repair(backdoored, tmp_path):
    """Batch statistics baked into a traced graph: each image's logits depend on its batch. 0.3.4 ran
    the whole repair and failed the write-back check (exit 3)."""
    import copy

    module = _BatchNormInTraining(copy.deepcopy(backdoored["module"])).train()
    src = tmp_path / "train_mode.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(module, torch.rand(4, 3, 32, 32)), str(src))
    out = tmp_path / "fixed.pt"
    code, _, err = invoke("sanitize", src, "--clean", backdoored["clean100"], "--out", out)
    assert_one_line_error(code, err, 2, "changes with the rest of its batch", "after model.eval()")
    assert not out.exists()


def test_inspect_and_sanitize_refuse_damaged_files_and_metadata_by_name(backdoored, tmp_path):
    """0.3.4's inspect exited 3 ("unexpected ...") on these and sanitize ignored num_classes "ten"."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(backdoored["model"]))
    cases = {}
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(backdoored["model"].read_bytes()[:5000])
    cases[truncated] = ["not a readable safetensors file", "download is complete"]
    bad_classes = tmp_path / "bad_classes.safetensors"
    save_file(tensors, str(bad_classes), metadata={"ibau.arch": "small-cnn", "ibau.num_classes": "ten"})
    cases[bad_classes] = ["metadata ibau.num_classes is 'ten', not a positive integer"]
    bad_pre = tmp_path / "bad_pre.safetensors"
    save_file(tensors, str(bad_pre), metadata={"ibau.arch": "small-cnn", "ibau.preprocess": "{nope"})
    cases[bad_pre] = ["metadata ibau.preprocess is not valid"]
    for path, needles in cases.items():
        code, _, err = invoke("inspect", path)
        assert_one_line_error(code, err, 2, str(path), *needles)
        code, _, err = invoke("sanitize", path, "--clean", backdoored["clean100"], "--out", tmp_path / "o.safetensors")
        assert_one_line_error(code, err, 2, str(path), *needles)


def test_a_half_precision_safetensors_file_is_repaired_and_written_back_in_half_precision(backdoored, tmp_path):
    """0.3.4 wrote float16 and bfloat16 inputs back as float32 (twice the size, another dtype)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    src = tmp_path / "half.safetensors"
    with safe_open(str(backdoored["model"]), framework="pt") as fh:
        meta = fh.metadata()
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(backdoored["model"])).items()}
    save_file(tensors, str(src), metadata=meta)
    out = tmp_path / "fixed.safetensors"
    res = run_cli(*sanitize_with_trigger(backdoored, src, "clean100", out, "--json", "--quiet"))
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert any("stored as float16" in n for n in report["model"]["notes"]), report["model"]["notes"]
    assert report["verification"]["max_abs_logit_diff"] == 0.0  # the figures are the written weights'
    written = load_file(str(out))
    assert {v.dtype for k, v in written.items() if k in tensors and tensors[k].is_floating_point()} == {torch.float16}
    module = ARCHS.get("small-cnn").build(10)
    module.load_state_dict({k: v.float() for k, v in written.items()})
    acc0, asr0 = independent_figures(backdoored["module"], backdoored["x_eval"], backdoored["y_eval"])
    acc1, asr1 = independent_figures(module.eval(), backdoored["x_eval"], backdoored["y_eval"])
    assert asr0 > 0.9 and asr1 < 0.2 and acc0 - acc1 < 0.05, (acc0, acc1, asr0, asr1)


class _InChunksOf(torch.nn.Module):
    """Plain chunking for a program that takes only ``size`` images at a time (the test's own)."""

    def __init__(self, program_module: torch.nn.Module, size: int) -> None:
        super().__init__()
        self.program, self.size = program_module, size

    def train(self, mode: bool = True) -> _InChunksOf:  # an exported module refuses train()/eval()
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        pad = (-n) % self.size
        x = torch.cat([x, x[-1:].expand(pad, *x.shape[1:])]) if pad else x
        return torch.cat([self.program(x[i : i + self.size]) for i in range(0, len(x), self.size)])[:n]


@pytest.mark.parametrize("batch", ["fixed", "bounded"])
def test_a_program_exported_with_a_fixed_or_bounded_batch_is_repaired_and_keeps_it(backdoored, tmp_path, batch):
    """torch.export's default is a fixed batch. 0.3.5 refused those (exit 2), failed mid-run on a
    batch bound below its own batches ("Guard failed", exit 3) and, with a higher bound, repaired the
    model and then could not write it (exit 3). ibau runs such a program in chunks within its range
    and writes it back with the same range."""
    src = tmp_path / f"{batch}.pt2"
    dynamic = None if batch == "fixed" else ({0: torch.export.Dim("batch", max=16)},)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(backdoored["module"].eval(), (torch.rand(8, 3, 32, 32),), dynamic_shapes=dynamic)
        torch.export.save(program, str(src))
    out = tmp_path / "repaired.pt2"
    rounds = [] if batch == "fixed" else ["--rounds", "0"]  # the bounded one: chunks and the write-back only
    code, stdout, err = invoke(*sanitize_with_trigger(backdoored, src, "clean100", out, "--json", "-q", *rounds))
    if batch == "fixed":  # the gates on 20 held-out images: GPU arithmetic can move one past a limit
        assert code in (0, 1), err
    else:
        assert code == 1, err  # no rounds: the backdoor stays, the ASR gate fails
    notes = json.loads(stdout)["model"]["notes"]
    accepted = "a fixed batch of 8" if batch == "fixed" else "batches of 1 to 16"
    assert any(f"accepts {accepted}" in n for n in notes), notes
    code, stdout, _ = invoke("inspect", out, "--json")  # 0.3.5's inspect refused a fixed batch too
    assert code == 0
    shown = json.loads(stdout)  # the program's own names and input, not ibau's wrapper's (0.4.5: "inner.")
    assert shown["graph"] == "torch.export program" and shown["input_shape"] == [3, 32, 32], shown
    assert not any(name.startswith("inner.") for name in shown["first_tensors"]), shown["first_tensors"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = torch.export.load(str(out)).module()  # plain torch, no ibau
    with pytest.raises(Exception):  # noqa: B017 - the written program keeps the range it came with
        plain(torch.rand(17, 3, 32, 32))
    if batch == "fixed":
        acc1, asr1 = independent_figures(_InChunksOf(plain, 8), backdoored["x_eval"], backdoored["y_eval"])
        assert asr1 < 0.2, asr1


def test_inspect_warns_when_the_metadata_class_count_disagrees_with_the_weights(backdoored, tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "wrong_count.safetensors"
    save_file(
        load_file(str(backdoored["model"])), str(path), metadata={"ibau.arch": "small-cnn", "ibau.num_classes": "7"}
    )
    code, stdout, err = invoke("inspect", path, "--json")
    assert code == 0, err
    (warning,) = json.loads(stdout)["warnings"]
    assert "says 7 classes" in warning and "classifier.weight has 10" in warning
    # sanitize says so too (0.4.5 did not), and writes the right count
    out = tmp_path / "fixed.safetensors"
    code, stdout, err = invoke("sanitize", path, "--clean", backdoored["clean100"], "--rounds", "0", "--no-probes",
                               "--out", out, "--json", "-q")  # fmt: skip
    assert any("metadata says 7 classes" in w for w in json.loads(stdout)["warnings"]), err
    assert json.loads(invoke("inspect", out, "--json")[1])["num_classes"] == 10


def test_the_same_model_is_written_to_the_same_bytes(backdoored, tmp_path):
    """The safetensors writer keeps metadata in a hash map: ten saves of one model gave ten sha256
    sums, so a registry comparing hashes saw a change where there was none. ibau sorts the header."""
    import hashlib

    from safetensors import safe_open

    from ibau_cli.formats import save_model
    from ibau_cli.preprocess import Preprocess

    digests = set()
    for i in range(4):
        path = tmp_path / f"m{i}.safetensors"
        save_model(
            backdoored["module"], path, fmt="safetensors", arch="small-cnn", num_classes=10, preprocess=Preprocess(),
            extra_metadata={f"note.{k}": str(k) for k in range(8)},
        )  # fmt: skip
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1
    reloaded = load_model(tmp_path / "m0.safetensors").module
    state = backdoored["module"].state_dict()
    assert all(torch.equal(reloaded.state_dict()[k].cpu(), v.cpu()) for k, v in state.items())
    with safe_open(str(tmp_path / "m0.safetensors"), "pt") as f:
        assert f.metadata()["ibau.arch"] == "small-cnn" and f.metadata()["note.7"] == "7"


@pytest.mark.parametrize(
    "layout",
    ["torch.compile", "lightning", "averaged-model", "ema-only", "with-a-version-number"],
)
def test_checkpoints_as_wrappers_and_tools_save_them(backdoored, tmp_path, layout):
    """State dicts as third parties ship them: torch.compile's `_orig_mod.` prefix, a Lightning
    module's `model.`, AveragedModel's `module.` beside its `n_averaged` counter, an EMA-only
    checkpoint, a plain number among the tensors. 0.3.6 refused each (exit 2, blaming --arch)."""
    sd = {k: v.clone() for k, v in backdoored["module"].state_dict().items()}
    path = tmp_path / "model.pt"
    if layout == "torch.compile":
        torch.save({f"_orig_mod.{k}": v for k, v in sd.items()}, path)
    elif layout == "lightning":
        torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3, "global_step": 120}, path)
    elif layout == "averaged-model":
        torch.save({"n_averaged": torch.tensor(5), **{f"module.{k}": v for k, v in sd.items()}}, path)
    elif layout == "ema-only":
        torch.save({"ema": sd, "epoch": 3}, path)
    else:
        torch.save({**sd, "_version": 2}, path)
    loaded = load_model(path, arch="small-cnn")
    for k, v in loaded.module.state_dict().items():
        assert torch.equal(v, sd[k]), k
    if layout == "lightning":  # and through the CLI once (loading is what differs between layouts)
        code, _, err = invoke("sanitize", path, "--arch", "small-cnn", "--clean", backdoored["clean100"],
                              "--out", tmp_path / "fixed.pt", "--rounds", "1", "--quiet")  # fmt: skip
        assert code == 0, err


def test_tied_weights_stored_once_load_into_both_places(tmp_path):
    """safetensors.torch.save_model drops the second name of a shared tensor; the architecture's two
    names for it are one parameter, so the file is complete."""
    from safetensors.torch import save_model

    arch = tmp_path / "tied.py"
    arch.write_text(
        "import torch\n"
        "class Tied(torch.nn.Module):\n"
        "    def __init__(self, num_classes=10):\n"
        "        super().__init__()\n"
        "        self.embed = torch.nn.Linear(3 * 32 * 32, 16)\n"
        "        self.fc1 = torch.nn.Linear(16, 16)\n"
        "        self.fc2 = torch.nn.Linear(16, 16)\n"
        "        self.fc2.weight = self.fc1.weight\n"
        "        self.head = torch.nn.Linear(16, num_classes)\n"
        "    def forward(self, x):\n"
        "        return self.head(self.fc2(torch.relu(self.fc1(self.embed(x.flatten(1))))))\n"
    )
    import importlib.util

    spec = importlib.util.spec_from_file_location("tied_arch", arch)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    model = mod.Tied()
    save_model(model, str(tmp_path / "tied.safetensors"))
    loaded = load_model(tmp_path / "tied.safetensors", arch=f"{arch}:Tied")
    assert torch.equal(loaded.module.fc2.weight, model.fc1.weight)
    assert loaded.module.fc2.weight is loaded.module.fc1.weight  # still one parameter


def test_user_code_and_files_that_cannot_be_used_are_exit_2_before_any_work(backdoored, tmp_path):
    """An --arch file that calls sys.exit (0.3.6: its code became ibau's, exit 0 read as a pass), a
    TorchScript archive whose tensors are on the meta device (0.3.6: exit 3 "unexpected"), and an
    --out .ts for a model TorchScript cannot compile (0.3.6: exit 3 after the whole repair)."""
    exits = tmp_path / "exits.py"
    exits.write_text("import sys\nsys.exit(0)\n")
    code, _, err = invoke("scan", backdoored["model"], "--arch", f"{exits}:Net", "--clean", backdoored["clean100"])
    assert_one_line_error(code, err, 2, "exits.py", "SystemExit")

    class Meta(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 32 * 32, 10, device="meta")

        def forward(self, x):
            return self.fc(x.flatten(1))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(Meta()), str(tmp_path / "meta.pt"))
    code, _, err = invoke("scan", tmp_path / "meta.pt", "--clean", backdoored["clean100"])
    assert_one_line_error(code, err, 2, "meta.pt", "no weight data")

    unscriptable = tmp_path / "varargs.py"
    unscriptable.write_text(
        "import torch\n"
        "from ibau_cli.archs.small_cnn import SmallCNN\n"
        "class Net(SmallCNN):\n"
        "    def forward(self, *inputs):\n"
        "        return super().forward(inputs[0])\n"
    )
    sd = tmp_path / "sd.pt"
    torch.save(backdoored["module"].state_dict(), sd)
    out = tmp_path / "fixed.ts"
    code, _, err = invoke(
        "sanitize", sd, "--arch", f"{unscriptable}:Net", "--clean", backdoored["clean100"], "--out", out
    )
    assert_one_line_error(code, err, 2, "fixed.ts", "cannot be compiled to TorchScript")
    assert not out.exists()


def test_a_half_precision_torchscript_model_is_repaired_and_written_back_in_half(backdoored, tmp_path):
    """A scripted model saved in float16 (0.3.6: exit 2, "set the input size", from a float/half
    mismatch): computed in float32 as a half-precision state dict is, written back in float16."""
    import copy

    src = tmp_path / "half.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(_jit(copy.deepcopy(backdoored["module"]).half(), traced=False), str(src))
    out = tmp_path / "fixed.pt"
    res = run_cli(*sanitize_with_trigger(backdoored, src, "clean500", out, "--json", "--quiet"))
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert any("float16" in note for note in report["model"]["notes"]), report["model"]["notes"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        written = torch.jit.load(str(out))
    assert {p.dtype for p in written.parameters()} == {torch.float16}
    acc0, asr0 = independent_figures(backdoored["module"], backdoored["x_eval"], backdoored["y_eval"])
    acc1, asr1 = independent_figures(load_model(out).module, backdoored["x_eval"], backdoored["y_eval"])
    assert asr0 > 0.9 and asr1 < 0.2 and acc0 - acc1 < 0.05, (acc0, acc1, asr0, asr1)


def test_a_torchscript_forward_that_needs_two_inputs_is_named(backdoored, tmp_path):
    class TwoInputs(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, scale):
            return self.inner(x) * scale

    import copy

    src = tmp_path / "two.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(TwoInputs(copy.deepcopy(backdoored["module"]).eval())), str(src))
    code, _, err = invoke("scan", src, "--clean", backdoored["clean100"])
    assert_one_line_error(code, err, 2, "two.pt", "forward takes 2 inputs (x, scale)")


def test_a_torchscript_archive_calling_an_unloaded_custom_operator_names_it(backdoored, tmp_path):
    """torch.ops.<library>.<op> lives in an extension library, not in the archive; ibau loads none."""
    import copy

    lib = torch.library.Library("ibau_test_ops", "DEF")  # registered in this process only
    lib.define("shifted(Tensor x) -> Tensor")
    lib.impl("shifted", lambda x: x + 0.0, "CompositeExplicitAutograd")

    class Custom(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return torch.ops.ibau_test_ops.shifted(self.inner(x))

    src = tmp_path / "custom.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(
            torch.jit.trace(Custom(copy.deepcopy(backdoored["module"]).eval()), torch.rand(2, 3, 32, 32)), str(src)
        )
    res = run_cli("inspect", src)  # a fresh process, where the operator is not registered
    assert res.returncode == 2 and "custom operator ibau_test_ops::shifted" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_attention_traced_under_no_grad_is_refused_before_any_work(backdoored, tmp_path):
    """Traced under torch.no_grad(), nn.MultiheadAttention records its fused inference kernel
    (aten::_native_multi_head_attention), which has no gradient: the repair and the synthesised probes
    cannot run on it. The same model traced with gradients enabled loads and is repaired."""
    from test_units import _TinyAttention

    from ibau_cli.config import UnlearnConfig
    from ibau_cli.unlearn import unlearn

    torch.manual_seed(0)
    model, x = _TinyAttention().eval(), torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        fused = torch.jit.trace(model, x, check_trace=False)
    assert "aten::_native_multi_head_attention" in str(fused.inlined_graph)
    torch.jit.save(fused, tmp_path / "fused.pt")
    with pytest.raises(Exception, match="no gradient") as info:
        load_model(tmp_path / "fused.pt")
    assert "gradients enabled" in info.value.hint
    code, _, err = invoke("scan", tmp_path / "fused.pt", "--clean", backdoored["clean100"], "--input-size", "8x8")
    assert_one_line_error(code, err, 2, "fused.pt", "no gradient")

    torch.jit.save(torch.jit.trace(model, x, check_trace=False), tmp_path / "plain.pt")
    # scripted, the fused kernel sits in a branch taken only when nothing needs a gradient (0.4.5
    # refused it, and its hint said to script the model)
    # (scripted in a fresh process: after a dynamo ONNX export in the same pytest worker,
    # torch.jit.script of any Conv2d failed with "builtin cannot be used as a value: F.pad")
    import subprocess
    import sys

    torch.save(model.state_dict(), tmp_path / "weights.pt")
    child = (
        f"import sys, warnings, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "from test_units import _TinyAttention; warnings.simplefilter('ignore'); m = _TinyAttention().eval(); "
        f"m.load_state_dict(torch.load({str(tmp_path / 'weights.pt')!r})); s = torch.jit.script(m); "
        "assert 'aten::_native_multi_head_attention' in str(s.inlined_graph); "  # the branch is there
        f"torch.jit.save(s, {str(tmp_path / 'scripted.pt')!r})"
    )
    res = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    y = torch.arange(16) % 3
    cfg = UnlearnConfig(rounds=1, inner_steps=2, min_steps_per_round=2, small_set="off")
    for name in ("plain.pt", "scripted.pt"):
        loaded = load_model(tmp_path / name)
        _, log = unlearn(loaded.module, torch.rand(16, 3, 8, 8), y, cfg)
        assert log.rounds[0].neumann_terms_mean > 0, name
