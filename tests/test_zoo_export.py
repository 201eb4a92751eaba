"""benchmarks/zoo.py export-formats: a committed zoo model written as ONNX, TorchScript and a
checkpoint, each loaded back by ibau and giving the safetensors model's predictions."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import torch

from conftest import REPO
from ibau_cli.formats import load_model
from ibau_cli.preprocess import Normalized, Preprocess


def test_export_formats_writes_every_format_ibau_reads(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(REPO / "benchmarks" / "zoo-models" / "gtsrb-smallcnn-badnets", run)
    res = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "zoo.py"), "export-formats", str(run)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    files = json.loads((run / "manifest.json").read_text())["files"]
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def logits(path):
        loaded = load_model(path)
        with torch.no_grad():
            return Normalized(loaded.module, loaded.preprocess or Preprocess()).eval()(x)

    ref = logits(run / "model.safetensors")
    for fmt in ("onnx", "torchscript", "checkpoint"):
        path = run / files[f"model_{fmt}"]
        assert load_model(path).fmt == fmt
        torch.testing.assert_close(logits(path), ref, rtol=1e-4, atol=1e-4)
    bad = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "zoo.py"), "export-formats", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "not a finished zoo run" in bad.stderr
