"""End to end through the real command line: a real backdoor, removed, checked independently."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from conftest import KNOWN_TRIGGER_ON, independent_figures, run_cli, sanitize_with_trigger
from ibau_cli.archs import ARCHS


def _load_independently(path):
    """Load the written file with plain safetensors + the architecture, no ibau loader."""
    tensors = load_file(str(path))
    model = ARCHS.get("small-cnn").build(tensors["classifier.weight"].shape[0])
    model.load_state_dict(tensors)
    return model.eval()


@pytest.mark.parametrize("clean_key", ["clean500", "clean100"])
def test_sanitize_removes_backdoor(backdoored, tmp_path, clean_key):
    out = tmp_path / "fixed.safetensors"
    report_path = tmp_path / "report.json"
    before_bytes = backdoored["model"].read_bytes()
    res = run_cli(*sanitize_with_trigger(backdoored, backdoored["model"], clean_key, out, "--report", report_path))
    assert res.returncode == 0, res.stderr + res.stdout
    assert backdoored["model"].read_bytes() == before_bytes  # input never modified

    acc0, asr0 = independent_figures(backdoored["module"], backdoored["x_eval"], backdoored["y_eval"])
    acc1, asr1 = independent_figures(_load_independently(out), backdoored["x_eval"], backdoored["y_eval"])
    assert asr0 >= 0.9
    assert asr1 < 0.20, (asr0, asr1)
    assert acc0 - acc1 < 0.05, (acc0, acc1)

    report = json.loads(report_path.read_text())
    assert report["schema_version"] == "1.0"
    assert report["verdict"] == "pass"
    n = 500 if clean_key == "clean500" else 100
    assert report["data"]["n_images"] == n
    assert report["data"]["n_unlearn"] + report["data"]["n_holdout"] == n
    assert report["data"]["n_holdout"] == round(0.2 * n)
    assert report["before"]["asr"]["value"] > 0.8
    assert report["after"]["asr"]["value"] < report["before"]["asr"]["value"]
    assert report["output"]["sha256"] and report["input"]["sha256"] != report["output"]["sha256"]
    assert report["verification"]["argmax_agreement"] == 1.0
    # 80 unlearning images get the small-set schedule (twice the rounds, a shorter step); 400 do not
    small = report["unlearning"]["small_set"]
    assert small == (clean_key == "clean100")
    assert len(report["rounds"]) == report["config"]["unlearn"]["rounds"] * (2 if small else 1)
    assert report["class_mapping"]["rule"] == "integer-folders"


def test_json_stdout_is_only_json_and_output_reloads_without_flags(backdoored, tmp_path):
    out = tmp_path / "fixed.safetensors"
    res = run_cli(
        "sanitize",
        backdoored["model"],
        "--clean",
        backdoored["clean100"],
        "--out",
        out,
        "--rounds",
        "1",
        "--json",
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)  # nothing else on stdout
    assert report["unlearning"]["guided_class"] is None  # probes off: plain I-BAU
    assert report["gates"][1] == {
        "name": "asr",
        "status": "not_evaluated",
        "limit": 0.2,
        "value": None,
        "detail": "no trigger supplied and probes off",
        "ci95": None,
    }
    assert any("not measured" in w for w in report["warnings"])
    # The written file carries its architecture and preprocessing: no --arch needed to reuse it.
    res2 = run_cli(
        "sanitize",
        out,
        "--clean",
        backdoored["clean100"],
        "--out",
        tmp_path / "again.safetensors",
        "--rounds",
        "1",
        "--json",
        "--quiet",
    )
    assert res2.returncode == 0, res2.stderr
    meta = json.loads(res2.stdout)
    assert meta["model"]["architecture"] == "small-cnn"
    assert "model metadata" in meta["config_layers"]


def test_gate_failure_exits_1(backdoored, tmp_path):
    # A learning rate too small to change anything leaves the backdoor in place.
    res = run_cli(
        *sanitize_with_trigger(
            backdoored,
            backdoored["model"],
            "clean100",
            tmp_path / "o.safetensors",
            "--rounds",
            "1",
            "--set",
            "unlearn.lr=1e-12",
            "--report",
            tmp_path / "r.json",
        )
    )
    assert res.returncode == 1, res.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verdict"] == "fail"
    asr_gate = next(g for g in report["gates"] if g["name"] == "asr")
    assert asr_gate["status"] == "fail" and asr_gate["value"] > 0.2


def test_a_given_trigger_that_works_is_unlearned_directly(backdoored, tmp_path):
    """0.4.1: `--trigger` does more than measure when it works before the repair (its ASR >= 50 %):
    it is stamped on a tenth of each batch's clean images with their true labels, it guides the repair
    toward its class when the probes suspect none (they are off here), and it is the early stop's
    proxy. The other tests here pass `unlearn.known_trigger = "off"` (conftest), so that they check
    I-BAU alone; this one is the default."""
    out, report_path = tmp_path / "fixed.safetensors", tmp_path / "r.json"
    res = run_cli(*sanitize_with_trigger(backdoored, backdoored["model"], "clean100", out, "--report", report_path,
                                         "--set", KNOWN_TRIGGER_ON, "-q"))  # fmt: skip
    assert res.returncode == 0, res.stderr + res.stdout
    report = json.loads(report_path.read_text())
    unlearning = report["unlearning"]
    assert unlearning["known_trigger"] == {"fraction": 0.1, "asr_before": report["before"]["asr"]["value"]}
    assert unlearning["guided_class"] == 0 and unlearning["guided_by"] == "trigger"
    assert unlearning["early_stop"]["proxy_trigger"] == "given trigger"  # 80 images: the small-set schedule
    acc0, asr0 = independent_figures(backdoored["module"], backdoored["x_eval"], backdoored["y_eval"])
    acc1, asr1 = independent_figures(_load_independently(out), backdoored["x_eval"], backdoored["y_eval"])
    assert asr0 >= 0.9 and asr1 < 0.05, (asr0, asr1)  # on 1,000 images ibau never saw
    assert acc0 - acc1 < 0.05, (acc0, acc1)


def test_the_report_names_the_held_out_images_and_the_trigger_file(backdoored, tmp_path):
    """QA24: a report gave only how many images were held out, not which. ``data.holdout_files`` lists
    them; the input model's predictions on exactly those files, read back independently, give the
    report's accuracy and ASR before the repair. The trigger file's sha256 is recorded too."""
    import hashlib
    import shutil

    import torch

    from ibau_cli.data import load_clean_folder
    from ibau_cli.demo import TARGET, add_badnets_trigger
    from ibau_cli.preprocess import Preprocess

    res = run_cli("sanitize", backdoored["model"], "--clean", backdoored["clean100"], "--out",
                  tmp_path / "fixed.safetensors", "--rounds", "0", "--trigger", backdoored["trigger"],
                  "--target", str(TARGET), "--json", "-q")  # fmt: skip
    assert res.returncode == 1, res.stderr  # nothing repaired: the ASR gate fails
    report = json.loads(res.stdout)
    files = report["data"]["holdout_files"]
    assert len(files) == report["data"]["n_holdout"] == 20 and files == sorted(set(files))
    chosen = tmp_path / "holdout"
    for name in files:
        (chosen / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(backdoored["clean100"] / name, chosen / name)
    held = load_clean_folder(chosen, Preprocess(), 10)
    model = backdoored["module"].eval()
    with torch.no_grad():
        clean_hits = int((model(held.images).argmax(1) == held.labels).sum())
        keep = held.labels != TARGET
        asr_hits = int((model(add_badnets_trigger(held.images[keep])).argmax(1) == TARGET).sum())
    before = report["before"]
    assert (before["accuracy"]["hits"], before["accuracy"]["n"]) == (clean_hits, len(files))
    assert (before["asr"]["hits"], before["asr"]["n"]) == (asr_hits, int(keep.sum()))
    trigger = report["trigger"]
    assert trigger["sha256"] == hashlib.sha256(backdoored["trigger"].read_bytes()).hexdigest()
    assert trigger["mask_sha256"] is None
