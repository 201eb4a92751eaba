"""Every bad input ends in one clear line and a documented exit code, never a traceback."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from conftest import KNOWN_TRIGGER_ON, run_cli, without_probes
from ibau_cli.cli import main
from ibau_cli.errors import InputError


def invoke(*args, probes: bool = False) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, without_probes(args, probes), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def assert_one_line_error(code: int, err: str, expected_code: int, *needles: str) -> None:
    assert code == expected_code, err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture()
def bare_weights(backdoored, tmp_path):
    """The backdoored weights without ibau metadata, as a third party would ship them."""
    from safetensors.torch import load_file

    path = tmp_path / "third_party.safetensors"
    save_file(load_file(str(backdoored["model"])), str(path))
    return path


def test_missing_architecture(bare_weights, backdoored, tmp_path):
    """Tensors only: the one registered architecture whose every weight the file holds under the
    same name and shape is taken (said in the notes); tensors that fit none are an error asking for
    --arch, and so are tensors that fit several."""
    from safetensors.torch import load_file

    quick = [
        "--clean",
        backdoored["clean100"],
        "--rounds",
        "0",
        "--no-probes",
        "-q",
        "--out",
        tmp_path / "o.safetensors",
    ]
    code, stdout, err = invoke("sanitize", bare_weights, *quick, "--json")
    notes = json.loads(stdout)["model"]["notes"]
    assert code in (0, 1) and notes[0].startswith("architecture 'small-cnn' from the registry: the only"), (err, notes)
    code, stdout, err = invoke("inspect", bare_weights, "--json")  # the header only, as sanitize matches it
    shown = json.loads(stdout)
    assert (shown["architecture"], shown["architecture_source"][:8]) == ("small-cnn", "registry"), shown
    # the class count from the architecture's last layer, the input shape from its declaration (0.4.5:
    # a guess and None); so too under a DataParallel prefix
    assert shown["num_classes_source"] == "architecture small-cnn: classifier.weight", shown
    assert shown["input_shape"] == [3, 32, 32], shown
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"module." + k: v for k, v in load_file(str(bare_weights)).items()}, wrapped)
    shown = json.loads(invoke("inspect", wrapped, "--json")[1])
    assert shown["num_classes_source"] == "architecture small-cnn: module.classifier.weight", shown
    tensors = load_file(str(bare_weights))
    extra = tmp_path / "extra.safetensors"
    save_file({**tensors, "adapter.weight": torch.zeros(4, 4)}, str(extra))  # a layer no architecture has
    code, _, err = invoke("sanitize", extra, *quick)
    assert_one_line_error(code, err, 2, "architecture is unknown", "--arch")
    assert "fit no registered architecture" in err

    from ibau_cli.archs import ARCHS, ArchSpec, register_arch
    from ibau_cli.archs.small_cnn import SmallCNN

    register_arch(ArchSpec("small-cnn-twin", SmallCNN, "classifier.weight"), origin="test")
    try:
        code, _, err = invoke("sanitize", bare_weights, *quick)
        assert_one_line_error(code, err, 2, "fit 2 registered ones (small-cnn, small-cnn-twin)", "--arch small-cnn")
    finally:
        ARCHS.forget_origin("test")


def test_unknown_architecture(bare_weights, backdoored):
    code, _, err = invoke("sanitize", bare_weights, "--clean", backdoored["clean100"], "--arch", "nope")
    assert_one_line_error(code, err, 2, "unknown architecture 'nope'", "small-vgg")


def test_mismatched_keys_are_listed(bare_weights, backdoored):
    code, _, err = invoke("sanitize", bare_weights, "--clean", backdoored["clean100"], "--arch", "small-vgg")
    assert_one_line_error(code, err, 2, "do not fit the architecture", "missing", "unexpected")


def test_misshaped_tensor_is_listed(backdoored, tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(str(backdoored["model"]))
    tensors["features.0.weight"] = torch.zeros(8, 3, 3, 3)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata={"ibau.arch": "small-cnn"})
    code, _, err = invoke("sanitize", path, "--clean", backdoored["clean100"])
    assert_one_line_error(code, err, 2, "mis-shaped", "features.0.weight")


def test_empty_clean_folder(backdoored, tmp_path):
    (tmp_path / "empty" / "3").mkdir(parents=True)
    code, _, err = invoke(
        "sanitize", backdoored["model"], "--clean", tmp_path / "empty", "--out", tmp_path / "o.safetensors"
    )
    assert_one_line_error(code, err, 2, "holds no images")


def test_no_class_folders(backdoored, tmp_path):
    (tmp_path / "flat").mkdir()
    code, _, err = invoke(
        "sanitize", backdoored["model"], "--clean", tmp_path / "flat", "--out", tmp_path / "o.safetensors"
    )
    assert_one_line_error(code, err, 2, "no class sub-folders")


def test_one_class_folder(backdoored, tmp_path):
    shutil.copytree(backdoored["clean100"] / "3", tmp_path / "one" / "3")
    code, _, err = invoke(
        "sanitize", backdoored["model"], "--clean", tmp_path / "one", "--out", tmp_path / "o.safetensors"
    )
    assert_one_line_error(code, err, 2, "only one class")


def test_unreadable_image(backdoored, tmp_path):
    clean = tmp_path / "clean"
    shutil.copytree(backdoored["clean100"], clean)
    (clean / "2" / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "o.safetensors"
    code, _, err = invoke("sanitize", backdoored["model"], "--clean", clean, "--out", out)
    assert_one_line_error(code, err, 2, "cannot read image", "broken.png")
    assert not out.exists()


def test_a_class_folder_that_cannot_be_listed_is_named(backdoored, tmp_path, monkeypatch):
    """A QA run (chmod 000 on a class folder, as a user without the rights) exited 3 with
    "unexpected PermissionError". Root reads any folder here, so the refusal is raised for it."""
    from pathlib import Path

    clean = tmp_path / "clean"
    shutil.copytree(backdoored["clean100"], clean)
    locked = clean / "3"
    listing = Path.iterdir

    def iterdir(self):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return listing(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    out = tmp_path / "o.safetensors"
    code, _, err = invoke("sanitize", backdoored["model"], "--clean", clean, "--out", out)
    assert_one_line_error(code, err, 2, "cannot list folder", str(locked), "Permission denied", "chmod")
    assert not out.exists()


def test_an_output_path_that_is_a_pipe_or_device_is_refused_not_replaced(backdoored, tmp_path):
    """A QA run as root turned /dev/full into a 108 KB model file (exit 0): ibau renames a finished
    file over its destination. A destination that exists and is not a regular file is refused."""
    import os
    import stat

    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    code, _, err = invoke("sanitize", backdoored["model"], "--clean", backdoored["clean100"], "--out", fifo)
    assert_one_line_error(code, err, 2, f"--out {fifo} is a named pipe (FIFO), not a regular file")
    pipe_report = tmp_path / "r.json"
    os.mkfifo(pipe_report)
    out = tmp_path / "o.safetensors"
    code, _, err = invoke("scan", backdoored["model"], "--clean", backdoored["clean100"], "--report", pipe_report)
    assert_one_line_error(code, err, 2, f"--report {pipe_report} is a named pipe (FIFO)")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and stat.S_ISFIFO(os.stat(pipe_report).st_mode)
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["sanitize", "m.safetensors", "--clean", "c", "--max-acc-drop", "5%"], "'5%' is not a valid float"),
        (["sanitise", "m.safetensors"], "No such command 'sanitise'. Did you mean 'sanitize'?"),
        (["sanitize", "m.safetensors"], "Missing option '--clean'"),
        # click kept the last of a one-value option silently: the gate ran on class 7
        (["scan", "m.pt", "--clean", "c", "--target", "3", "--target=7"], "--target is given twice (3 and 7)"),
        (["sanitize", "m.pt", "--clean", "c", "--out", "a.pt", "--max-acc-drop", "0.02", "--out", "b.pt"], "--out is"),
        (["config", "show", "--preset", "cifar10", "--preset", "gtsrb"], "--preset is given twice"),
        # a global option after the command (0.4.5): said where it goes
        (["sanitize", "m.pt", "--plugin", "p.py"], "--plugin is an option of ibau itself: put it before the command"),
    ],
)
def test_command_line_usage_errors_are_one_line_too(args, needle):
    """click printed its usage errors on three lines (Usage, Try, Error); ibau's own are one line
    with what to do, and so are click's now: the message, then where the help is."""
    res = run_cli(*args)
    assert_one_line_error(res.returncode, res.stderr, 2, needle, "--help`")


def test_repeatable_options_stay_repeatable():
    """--set and --report take several values; a value that looks like an option is a value."""
    from ibau_cli.repeated_options import refuse_repeated_options

    res = run_cli("config", "show", "--set", "unlearn.rounds=3", "--set", "unlearn.lr=0.01", "--json")
    assert res.returncode == 0, res.stderr
    cfg = json.loads(res.stdout)["config"]["unlearn"]
    assert (cfg["rounds"], cfg["lr"]) == (3, 0.01)
    ctx = main.make_context("ibau", ["scan", "m.pt", "--clean", "c"], resilient_parsing=True)
    scan_cmd = main.get_command(ctx, "scan")
    refuse_repeated_options(scan_cmd, ctx, ["m.pt", "--clean", "--target", "--target", "4"])  # a folder named --target
    res = run_cli("scan", "m.pt", "--clean", "c", "--target", "3", "--target", "7", "--help")
    assert res.returncode == 0 and "Usage: ibau scan" in res.stdout  # asking for help is answered
    res = run_cli("scan", "m.pt", "--clean", "c", "--target", "3", "--target")
    assert_one_line_error(res.returncode, res.stderr, 2, "Option '--target' requires an argument")


def test_a_file_name_that_is_not_utf8_is_named_before_any_work(backdoored, tmp_path):
    """0.3.8 read such an image, repaired the model, then failed writing the reports (exit 3, some
    written, some not): the name cannot go into a JSON report. Now it is an input error up front."""
    import os

    clean = tmp_path / "clean"
    shutil.copytree(backdoored["clean100"], clean)
    first = sorted((clean / "2").iterdir())[0]
    os.rename(first, os.path.join(os.fsencode(clean / "2"), b"\xff\xfegrey.png"))
    out = tmp_path / "o.safetensors"
    code, _, err = invoke(
        "sanitize", backdoored["model"], "--clean", clean, "--out", out, "--report", tmp_path / "r.json"
    )
    assert_one_line_error(code, err, 2, "b'\\xff\\xfegrey.png'", "is not valid UTF-8", "rename")
    assert not out.exists() and not (tmp_path / "r.json").exists()


def test_class_folders_naming_one_index_twice_are_named(backdoored, tmp_path):
    clean = tmp_path / "clean"
    shutil.copytree(backdoored["clean100"], clean)
    shutil.copytree(clean / "3", clean / "03")
    code, _, err = invoke("scan", backdoored["model"], "--clean", clean)
    assert_one_line_error(code, err, 2, "class folders '03' and '3'", "name the same class index")


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    config = tmp_path / "binary.toml"
    config.write_bytes(b"\xff\xfe[unlearn]\n")
    code, _, err = invoke("config", "show", "--config", config)
    assert_one_line_error(code, err, 2, str(config), "not UTF-8 text", "save the config as UTF-8")


def test_a_damaged_torchscript_archive_is_refused(backdoored, tmp_path):
    """torch.jit.load does not check the archive's checksums: a QA run flipped 200 bytes of one
    weight file and the model loaded (inspect exit 0; sanitize blamed the preprocessing)."""
    import struct
    import zipfile

    good = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(backdoored["module"].eval()), str(good))
    with zipfile.ZipFile(good) as zf:
        member = next(i for i in zf.infolist() if "/data/" in i.filename and i.file_size > 64)
    data = bytearray(good.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[member.header_offset + 26 : member.header_offset + 30])
    start = member.header_offset + 30 + name_len + extra_len
    data[start : start + 16] = bytes(b ^ 0xFF for b in data[start : start + 16])
    bad = tmp_path / "damaged.pt"
    bad.write_bytes(bytes(data))
    code, _, err = invoke("inspect", bad)
    assert_one_line_error(code, err, 2, f"member {member.filename} does not match its checksum")
    assert invoke("inspect", good)[0] == 0


def test_a_blank_line_among_the_class_names_is_refused(tmp_path):
    """A blank line inside a --classes file was dropped, which shifted every later class index by one."""
    from ibau_cli.data import map_classes

    folders = [tmp_path / n for n in ("cat", "dog", "eel")]
    names = tmp_path / "classes.txt"
    names.write_text("cat\n\ndog\neel\n\n")
    with pytest.raises(InputError, match=r"blank line \(line 2\)"):
        map_classes(folders, 4, names)
    names.write_text("cat\ndog\neel\n\n\n")  # blank lines at the end are fine
    assert map_classes(folders, 4, names).folder_to_index == {"cat": 0, "dog": 1, "eel": 2}
    names.write_text("cat\ndog\ncat\n")  # the name and its lines (0.4.5 named neither)
    with pytest.raises(InputError, match=r"class name 'cat' twice \(lines 1 and 3\)"):
        map_classes(folders, 4, names)


def test_an_empty_image_says_it_is_empty(tmp_path):
    from ibau_cli.images import open_image

    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match=r"empty.png is empty \(0 bytes\)"):
        open_image(tmp_path / "empty.png", "RGB")


@pytest.mark.parametrize("where", [".", "charts"])
def test_artifacts_inside_the_clean_folder_are_refused(backdoored, tmp_path, where):
    """A QA run wrote --artifacts into the --clean folder; the next run on that folder then failed on
    the PNGs at its top (or a folder that is not a class)."""
    clean = tmp_path / "clean"
    shutil.copytree(backdoored["clean100"], clean)
    before = sorted(p.name for p in clean.iterdir())
    mtime = clean.stat().st_mtime_ns
    code, _, err = invoke("scan", backdoored["model"], "--clean", clean, "--artifacts", clean / where)
    assert_one_line_error(code, err, 2, "--artifacts", f"is inside --clean {clean}")
    assert sorted(p.name for p in clean.iterdir()) == before and clean.stat().st_mtime_ns == mtime


@pytest.mark.parametrize(
    ("command", "flag", "name"),
    [("sanitize", "--out", "1/fixed.safetensors"), ("sanitize", "--report", "r.json"), ("scan", "--report", "r.json")],
)
def test_outputs_inside_the_clean_folder_are_refused(backdoored, tmp_path, command, flag, name):
    """QA24 wrote --out into a class folder of --clean and --report at its top: both runs exited 0,
    and the next run on that folder failed ("not images ibau reads", "not class folders")."""
    clean = tmp_path / "clean"
    shutil.copytree(backdoored["clean100"], clean)
    before = sorted(str(p.relative_to(clean)) for p in clean.rglob("*"))
    # not even touched: 0.4.5 tested the folder's writability (a file made and removed) first (a QA pass)
    times = {p: p.stat().st_mtime_ns for p in (clean, clean / "1")}
    args = ["--out", tmp_path / "o.safetensors"] if command == "sanitize" and flag != "--out" else []
    code, _, err = invoke(command, backdoored["model"], "--clean", clean, flag, clean / name, *args)
    assert_one_line_error(code, err, 2, flag, f"is inside --clean {clean}")
    assert sorted(str(p.relative_to(clean)) for p in clean.rglob("*")) == before
    assert {p: p.stat().st_mtime_ns for p in times} == times
    assert not (tmp_path / "o.safetensors").exists()


def test_an_output_link_in_the_clean_folder_is_inside_it(backdoored, tmp_path):
    """A link ``clean/0/o.safetensors`` pointing outside would be replaced by a regular file in the
    clean folder (outputs are renamed into place), so it counts as inside; a link outside pointing
    into the clean folder is replaced where it is, outside, and is allowed."""
    clean = tmp_path / "clean"
    shutil.copytree(backdoored["clean100"], clean)
    (tmp_path / "elsewhere").mkdir()
    (clean / "0" / "o.safetensors").symlink_to(tmp_path / "elsewhere" / "o.safetensors")
    code, _, err = invoke("sanitize", backdoored["model"], "--clean", clean, "--out", clean / "0" / "o.safetensors")
    assert_one_line_error(code, err, 2, "--out", f"is inside --clean {clean}")
    (clean / "0" / "o.safetensors").unlink()
    (tmp_path / "link.safetensors").symlink_to(clean / "0" / "x.safetensors")
    code, _, err = invoke("sanitize", backdoored["model"], "--clean", clean, "--out", tmp_path / "link.safetensors",
                          "--rounds", "0", "--no-probes")  # fmt: skip
    assert code == 0, err
    assert not (clean / "0" / "x.safetensors").exists() and (tmp_path / "link.safetensors").is_file()


def test_non_image_file_is_not_silently_skipped(backdoored, tmp_path):
    clean = tmp_path / "clean"
    shutil.copytree(backdoored["clean100"], clean)
    (clean / "2" / "notes.txt").write_text("hello")
    code, _, err = invoke("sanitize", backdoored["model"], "--clean", clean, "--out", tmp_path / "o.safetensors")
    assert_one_line_error(code, err, 2, "not images", "notes.txt")


def test_output_equal_to_input_is_refused(backdoored, tmp_path):
    model = tmp_path / "m.safetensors"
    shutil.copy(backdoored["model"], model)
    before = model.read_bytes()
    code, _, err = invoke("sanitize", model, "--clean", backdoored["clean100"], "--out", model)
    assert_one_line_error(code, err, 2, "is the input model")
    assert model.read_bytes() == before


def test_missing_model_file(backdoored, tmp_path):
    code, _, err = invoke("sanitize", tmp_path / "nope.safetensors", "--clean", backdoored["clean100"])
    assert_one_line_error(code, err, 2, "model file not found")


def test_garbage_model_file(backdoored, tmp_path):
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"\x00\x01garbage" * 10)
    code, _, err = invoke("sanitize", bad, "--clean", backdoored["clean100"])
    assert_one_line_error(code, err, 2, "not a model format")


def test_wrong_preprocessing_is_caught_before_repair(backdoored, tmp_path):
    out = tmp_path / "o.safetensors"
    args = [
        "sanitize",
        backdoored["model"],
        "--clean",
        backdoored["clean100"],
        "--out",
        out,
        "--mean",
        "0.9,0.9,0.9",
        "--std",
        "0.05,0.05,0.05",
    ]
    code, _, err = invoke(*args)
    assert_one_line_error(code, err, 2, "near chance" if False else "does not match the model", "--force")
    assert not out.exists()


def test_milder_preprocessing_mismatch_names_the_better_statistics(backdoored, tmp_path):
    """Above the accuracy floor but clearly worse than with no normalisation (the model's own): the run
    stops before any work and names the alternative; --force goes on with a warning."""
    out = tmp_path / "o.safetensors"
    wrong = ["--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5"]
    args = ["sanitize", backdoored["model"], "--clean", backdoored["clean100"], "--out", out, *wrong]
    code, _, err = invoke(*args)
    assert_one_line_error(code, err, 2, "with none (mean [0, 0, 0], std [1, 1, 1]", "--force")
    accuracy_given = float(err.split("accuracy is ")[1].split("%")[0])
    assert accuracy_given > 32.5  # above this 10-class model's floor: the floor alone would have passed it
    assert not out.exists()
    code, out_json, err = invoke(*args, "--force", "--rounds", "1", "--json")
    assert code in (0, 1), err  # a report was written; the gates are not this test's subject
    warnings = json.loads(out_json)["warnings"]
    assert any("continuing because of --force" in w and "with none" in w for w in warnings), warnings


def test_sign_test_and_candidates():
    from ibau_cli.normalisation_check import candidates, sign_test
    from ibau_cli.preprocess import Preprocess

    assert sign_test(10, 0) == 1 / 1024
    assert sign_test(900, 200) < 1e-100 and 0.05 < sign_test(3000, 2900) < 0.15  # 1,024+ pairs: no overflow
    assert sign_test(0, 0) == 1.0 and sign_test(3, 3) > 0.5
    names = [name for name, _ in candidates(Preprocess())]
    assert "none" not in names and "0.5 / 0.5" in names and "preset cifar10" in names  # the given one is left out
    # on one or two classes, or where an alternative pins the model to one class, nothing is compared
    from ibau_cli.normalisation_check import better_preprocess

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    x, y = torch.rand(40, 3, 4, 4), torch.zeros(40, dtype=torch.long)
    assert better_preprocess(model, Preprocess(input_size=(4, 4)), x, y, device=torch.device("cpu")) is None
    grey = [name for name, _ in candidates(Preprocess(channels=1, mean=(0.1307,), std=(0.3081,)))]
    assert "preset mnist" not in grey and "preset cifar10" not in grey and "none" in grey


@pytest.mark.parametrize(
    ("flag", "needle"),
    [
        (["--input-size", "100000"], "past 4096 pixels a side"),
        (["--rounds", "1000000000"], "unlearn.rounds = 1000000000 is past 1000"),
        (["--set", "probes.budget_steps=100000000"], "probes.budget_steps = 100000000 is past"),
    ],
)
def test_values_far_past_any_use_are_refused(backdoored, flag, needle):
    code, _, err = invoke("sanitize", backdoored["model"], "--clean", backdoored["clean100"], *flag)
    assert_one_line_error(code, err, 2, needle)


def test_out_of_memory_is_recognised():
    from ibau_cli.errors import out_of_memory, out_of_memory_size

    cpu = RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
        "allocate 120000000000 bytes. Error code 12 (Cannot allocate memory)"
    )
    assert out_of_memory(cpu) and out_of_memory_size(cpu) == " (an allocation of 120.0 GB failed)"
    cuda = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total capacity)")
    assert out_of_memory(cuda) and out_of_memory_size(cuda) == " (an allocation of 2.1 GB failed)"
    assert out_of_memory(MemoryError()) and not out_of_memory(RuntimeError("shape mismatch"))


def test_output_that_cannot_show_a_character_gets_an_escape(tmp_path):
    """An ASCII-only stderr (PYTHONIOENCODING=ascii) once turned a non-ASCII file name into exit 3."""
    import os
    import subprocess
    import sys

    missing = tmp_path / "modèle.safetensors"
    res = subprocess.run(
        [sys.executable, "-m", "ibau_cli", "scan", str(missing), "--clean", str(tmp_path)],
        capture_output=True,
        env=dict(os.environ, PYTHONIOENCODING="ascii"),
        timeout=120,
    )
    err = res.stderr.decode("ascii")
    assert res.returncode == 2, err
    assert "mod\\xe8le.safetensors" in err and "Traceback" not in err


def test_unknown_config_key(backdoored, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[unlearn]\nroundz = 3\n")
    code, _, err = invoke("sanitize", backdoored["model"], "--clean", backdoored["clean100"], "--config", cfg)
    assert_one_line_error(code, err, 2, "unknown key unlearn.roundz", "rounds")


def test_wrong_config_type(backdoored, tmp_path):
    code, _, err = invoke(
        "sanitize", backdoored["model"], "--clean", backdoored["clean100"], "--set", "unlearn.rounds=many"
    )
    assert_one_line_error(code, err, 2, "unlearn.rounds must be an integer")


def test_trigger_without_target(backdoored):
    code, _, err = invoke(
        "sanitize", backdoored["model"], "--clean", backdoored["clean100"], "--trigger", backdoored["trigger"]
    )
    assert_one_line_error(code, err, 2, "--target")


def test_cuda_requested_without_cuda(backdoored):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = invoke("sanitize", backdoored["model"], "--clean", backdoored["clean100"], "--device", "cuda")
    assert_one_line_error(code, err, 2, "CUDA is not available")


def test_runtime_failure_in_user_model_code_exits_3(backdoored, tmp_path):
    code_file = tmp_path / "arch.py"
    code_file.write_text(
        "import torch\n"
        "from ibau_cli.archs.small_cnn import SmallCNN\n"
        "class Flaky(SmallCNN):\n"
        "    calls = 0\n"
        "    def forward(self, x):\n"
        "        Flaky.calls += 1\n"
        "        if Flaky.calls > 3:\n"
        "            raise RuntimeError('device lost')\n"
        "        return super().forward(x)\n"
    )
    out = tmp_path / "o.safetensors"
    code, _, err = invoke(
        "sanitize", backdoored["model"], "--clean", backdoored["clean100"], "--arch", f"{code_file}:Flaky", "--out", out
    )
    assert_one_line_error(code, err, 3, "device lost", "--debug")
    assert not out.exists()


def test_user_model_code_via_arch_flag(backdoored, tmp_path):
    code_file = tmp_path / "mynet.py"
    code_file.write_text(
        "from ibau_cli.archs.small_cnn import SmallCNN\ndef build(num_classes=10):\n    return SmallCNN(num_classes)\n"
    )
    out = tmp_path / "o.safetensors"
    code, stdout, err = invoke(
        "sanitize",
        backdoored["model"],
        "--clean",
        backdoored["clean100"],
        "--arch",
        f"{code_file}:build",
        "--out",
        out,
        "--rounds",
        "1",
        "--json",
        "--quiet",
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert report["model"]["num_classes"] == 10
    # Metadata names user code, which is never run on the file's say-so.
    code, _, err = invoke("sanitize", out, "--clean", backdoored["clean100"], "--out", tmp_path / "o2.safetensors")
    assert_one_line_error(code, err, 2, "never runs", "--arch")


def test_report_destinations_that_would_destroy_a_model_are_refused_before_any_work(backdoored, tmp_path):
    """A report may not replace the input model, the repaired model or another report, and every
    destination must take files: all refused up front (exit 2), nothing written, the input intact."""
    model = tmp_path / "model.json"  # a model whose name says JSON, as a report's would
    shutil.copy(backdoored["model"], model)
    before = model.read_bytes()
    common = ("--clean", backdoored["clean100"], "--rounds", "1")
    code, _, err = invoke("sanitize", model, "--arch", "small-cnn", *common, "--out", tmp_path / "o.safetensors",
                          "--report", model)  # fmt: skip
    assert_one_line_error(code, err, 2, f"--report {model} is the input model")
    code, _, err = invoke("scan", model, "--arch", "small-cnn", "--clean", backdoored["clean100"], "--report", model)
    assert_one_line_error(code, err, 2, "is the input model")
    out = tmp_path / "fixed.json"
    code, _, err = invoke("sanitize", backdoored["model"], *common, "--out", out, "--report", out)
    assert_one_line_error(code, err, 2, "also the --out path")
    report = tmp_path / "r.json"
    code, _, err = invoke("sanitize", backdoored["model"], *common, "--report", report, "--report", report)
    assert_one_line_error(code, err, 2, "given twice")
    for flag, dest in (("--out", "/proc/x.safetensors"), ("--report", "/proc/r.json")):
        code, _, err = invoke("sanitize", backdoored["model"], *common, flag, dest)
        assert_one_line_error(code, err, 2, f"{flag} {dest}: folder /proc does not take a new file")
    code, _, err = invoke("sanitize", backdoored["model"], *common, "--artifacts", model)
    assert_one_line_error(code, err, 2, "is a file; give a folder")
    assert model.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_not_repaired(backdoored, tmp_path, bad):
    """A NaN or infinite weight would spread through the repair and every figure: exit 2 before any
    work, naming the file and the tensor, for sanitize and scan, even with --force."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(str(backdoored["model"]))
    with safe_open(str(backdoored["model"]), "pt") as sf:  # keep ibau's metadata: only one weight changes
        metadata = sf.metadata()
    name = sorted(tensors)[-1]
    tensors[name].view(-1)[0] = bad
    path = tmp_path / "broken.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    out = tmp_path / "o.safetensors"
    code, _, err = invoke("sanitize", path, "--clean", backdoored["clean100"], "--out", out, "--force")
    assert_one_line_error(code, err, 2, str(path), "1 weights are NaN or infinite", name)
    code, _, err = invoke("scan", path, "--clean", backdoored["clean100"], "--force")
    assert_one_line_error(code, err, 2, "NaN or infinite")
    assert not out.exists()


def test_finite_weights_whose_outputs_are_not_finite_are_named_as_such(backdoored, tmp_path):
    """A negative BatchNorm running variance: every weight finite, every output NaN. 0.4.5 blamed
    batch norm in training mode (the batch check compared NaN with NaN); a QA pass found it."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(str(backdoored["model"]))
    with safe_open(str(backdoored["model"]), "pt") as sf:
        metadata = sf.metadata()
    name = next(k for k in sorted(tensors) if k.endswith("running_var"))
    tensors[name] = -tensors[name]
    path = tmp_path / "negvar.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    code, _, err = invoke("sanitize", path, "--clean", backdoored["clean100"], "--out", tmp_path / "o.safetensors")
    assert_one_line_error(code, err, 2, str(path), "outputs are NaN or infinite", "weights are finite")
    assert not (tmp_path / "o.safetensors").exists()


def test_a_clean_set_missing_classes_is_reported(backdoored, tmp_path):
    """Figures measured on some of the classes only: said in the report's warnings, with the classes."""
    for c in ("0", "1", "2"):
        shutil.copytree(backdoored["clean500"] / c, tmp_path / "some" / c)
    code, out, err = invoke("sanitize", backdoored["model"], "--clean", tmp_path / "some", "--rounds", "1",
                            "--out", tmp_path / "o.safetensors", "--json", "-q")  # fmt: skip
    assert code == 0, err
    warnings = json.loads(out)["warnings"]
    assert any("3 of the model's 10 classes (none of 3, 4, 5, 6, 7, 8, 9)" in w for w in warnings), warnings


def test_settings_that_would_be_silently_ignored_are_errors(backdoored, tmp_path):
    """Trigger options without --trigger, an output name whose extension no format uses, and a scan
    told not to probe: each refused in one line (exit 2), not ignored."""
    clean = ("--clean", backdoored["clean100"])
    code, _, err = invoke("scan", backdoored["model"], *clean, "--trigger-pos", "tl", "--trigger-blend", "0.1")
    assert_one_line_error(code, err, 2, "--trigger-blend, --trigger-pos describe a trigger", "need --trigger")
    code, _, err = invoke("scan", backdoored["model"], *clean, "--target", "0")
    assert_one_line_error(code, err, 2, "--target describes a trigger: it needs --trigger IMAGE")
    out = tmp_path / "fixed.txt"
    code, _, err = invoke("sanitize", backdoored["model"], *clean, "--out", out)
    assert_one_line_error(code, err, 2, "extension '.txt'", ".safetensors")
    code, _, err = invoke("scan", backdoored["model"], *clean, "--set", "probes.enabled=false")
    assert_one_line_error(code, err, 2, "probes.enabled = false leaves it nothing to do")
    assert not out.exists()


def test_a_repair_that_diverges_exits_3_and_writes_nothing(backdoored, tmp_path):
    """Settings that blow the weights up: a runtime failure (exit 3) naming the cause, no model written
    (and so no NaN in any report)."""
    out = tmp_path / "o.safetensors"
    code, _, err = invoke("sanitize", backdoored["model"], "--clean", backdoored["clean100"], "--rounds", "1",
                          "--out", out, "--set", "unlearn.lr=1e30", "--set", "unlearn.max_grad_norm=1e30")  # fmt: skip
    assert_one_line_error(code, err, 3, "the repair diverged", "unlearn.lr")
    assert not out.exists()


def test_out_of_range_config_value_names_where_it_was_set(backdoored, tmp_path, monkeypatch):
    cfg = tmp_path / "team.toml"
    cfg.write_text("[unlearn]\nrounds = -2\n")
    code, _, err = invoke("scan", backdoored["model"], "--clean", backdoored["clean100"], "--config", cfg)
    assert_one_line_error(code, err, 2, "unlearn.rounds must be >= 0", f"(set by config {cfg})")
    monkeypatch.setenv("IBAU_GATE__MAX_ASR", "3")
    code, _, err = invoke("scan", backdoored["model"], "--clean", backdoored["clean100"])
    assert_one_line_error(code, err, 2, "gate.max_asr", "(set by environment IBAU_GATE__MAX_ASR)")


def _full_size_trigger(path, alpha: int | None = None):
    from PIL import Image

    rgb = Image.new("RGB", (32, 32), (255, 255, 255))
    if alpha is not None:
        rgb.putalpha(alpha)
    rgb.save(path)
    return path


@pytest.mark.parametrize("case", ["black-mask", "zero-one-mask", "transparent", "grey-additive"])
def test_a_trigger_that_changes_no_pixel_is_refused(backdoored, tmp_path, case):
    """It would measure an ASR of 0 % and pass the gate: refused before any work."""
    from PIL import Image

    out = tmp_path / "o.safetensors"
    args = ["--target", "0"]
    if case in ("black-mask", "zero-one-mask"):
        trig = _full_size_trigger(tmp_path / "t.png")
        mask = tmp_path / "mask.png"
        m = Image.new("L", (32, 32), 0)
        if case == "zero-one-mask":  # a 0/1 mask saved as 8-bit: the largest value is 1 of 255
            m.paste(1, (24, 24, 32, 32))
        m.save(mask)
        args += ["--trigger", trig, "--trigger-mask", mask]
        needles = ["trigger mask", "changes no pixel", "0/255" if case == "zero-one-mask" else "0 of 255"]
    elif case == "transparent":
        args += ["--trigger", _full_size_trigger(tmp_path / "t.png", alpha=0)]
        needles = ["fully transparent"]
    else:
        Image.new("RGB", (32, 32), (128, 128, 128)).save(tmp_path / "grey.png")
        args += ["--trigger", tmp_path / "grey.png", "--trigger-additive"]
        needles = ["mid-grey", "changes no pixel"]
    code, _, err = invoke("sanitize", backdoored["model"], "--clean", backdoored["clean100"], "--out", out, *args)
    assert_one_line_error(code, err, 2, *needles)
    assert not out.exists()


def test_trigger_pos_with_a_full_size_trigger_is_refused(backdoored, tmp_path):
    trig = _full_size_trigger(tmp_path / "t.png", alpha=128)
    code, _, err = invoke("scan", backdoored["model"], "--clean", backdoored["clean100"], "--trigger", trig,
                          "--target", "0", "--trigger-pos", "tl")  # fmt: skip
    assert_one_line_error(code, err, 2, "--trigger-pos tl", "whole 32x32 input")


def test_16_bit_images_are_read_as_their_8_bit_values(tmp_path):
    """PIL's own conversion clips 16-bit pixels at 255 (a white image); ibau scales them."""
    import numpy as np
    from PIL import Image

    from ibau_cli.images import open_image

    grey = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60  # 0 .. 61380
    Image.fromarray(grey).save(tmp_path / "wide.png")  # PIL writes uint16 as a 16-bit PNG
    assert Image.open(tmp_path / "wide.png").mode.startswith("I")
    got = np.asarray(open_image(tmp_path / "wide.png", "RGB"))
    assert got.shape == (32, 32, 3)
    expected = np.rint(grey / 257.0)
    assert np.abs(got[..., 0].astype(int) - expected).max() <= 1
    assert got.std() > 50  # not a flat white image


def test_an_image_too_large_to_decode_safely_is_named(backdoored, tmp_path, monkeypatch):
    from PIL import Image

    clean = tmp_path / "clean"
    shutil.copytree(backdoored["clean100"], clean)
    Image.new("RGB", (64, 64)).save(clean / "3" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 = 4,096 > 2x the limit: PIL refuses it
    code, _, err = invoke("scan", backdoored["model"], "--clean", clean)
    assert_one_line_error(code, err, 2, "huge.png", "too large to decode safely")


def test_ctrl_c_during_start_up_exits_130_not_the_gate_code(monkeypatch, capsys):
    """Click's own handling would print "Aborted!" and exit 1, which a CI step reads as a failed gate."""
    import ibau_cli.device
    from ibau_cli.cli import run

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ibau_cli.device, "fit_threads_to_cpu_quota", interrupted)
    with pytest.raises(SystemExit) as exc:
        run(["scan", "--help"])
    assert exc.value.code == 130
    assert "interrupted" in capsys.readouterr().err


@pytest.mark.parametrize(("signame", "code", "word"), [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
@pytest.mark.parametrize("slow", ["rich", "numpy"])
def test_a_signal_while_the_command_line_is_imported_exits_with_its_code(signame, code, word, slow):
    """Importing click and rich takes a tenth of a second or more; a QA run's Ctrl-C 0.05-0.15 s after
    the start printed a KeyboardInterrupt traceback. The console script (``ibau_cli.entry``) answers
    signals before that import: here the import is slowed down and the signal lands inside it.
    numpy: torch's C start-up imports it and swallows any error, a KeyboardInterrupt included; 0.4.5
    imported torch inside the command, and a Ctrl-C there ran on to fail with exit 3 (a QA pass)."""
    import subprocess
    import sys

    child = f"""
import importlib.abc, os, signal, sys, threading, time
class Slow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "{slow}":
            time.sleep(3)
        return None
sys.meta_path.insert(0, Slow())
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (xdist's workers ignore both)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.{signame})).start()
sys.argv = ["ibau", "--help"] if "{slow}" == "rich" else ["ibau", "inspect", "missing.safetensors"]
from ibau_cli.entry import main
main()
"""
    res = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert res.returncode == code and res.stderr.strip() == word, (res.returncode, res.stderr)


def test_the_entry_point_keeps_click_usage_errors_at_exit_2():
    from ibau_cli import interrupts
    from ibau_cli.cli import run

    with pytest.raises(SystemExit) as exc:
        run(["scan"])
    assert exc.value.code == 2
    # the run is over: later writes in this process are not its outputs, for a failed run to remove
    assert interrupts._created is None


@pytest.mark.parametrize("case", ["root-image", "sub-folder", "symlinked-folder"])
def test_images_the_folder_layout_would_skip_are_errors_naming_them(backdoored, tmp_path, case):
    """0.3.4 skipped these silently: images at the top of --clean, and sub-folders (or links to
    folders) inside a class folder."""
    clean = tmp_path / "clean"
    shutil.copytree(backdoored["clean100"], clean)
    some_image = next((clean / "1").iterdir())
    if case == "root-image":
        shutil.copy(some_image, clean / "stray.png")
        needles = ["at the top of", "stray.png", "belong to no class folder"]
    elif case == "sub-folder":
        (clean / "1" / "more").mkdir()
        shutil.copy(some_image, clean / "1" / "more" / "x.png")
        needles = ["holds a sub-folder, more", "would skip it"]
    else:
        (clean / "1" / "linked").symlink_to(clean / "2", target_is_directory=True)
        needles = ["holds a sub-folder, linked"]
    code, _, err = invoke("scan", backdoored["model"], "--clean", clean)
    assert_one_line_error(code, err, 2, *needles)


def test_classes_file_with_a_byte_order_mark_or_too_many_names(backdoored, tmp_path):
    clean = tmp_path / "clean"
    names = [f"class_{i}" for i in range(10)]
    for i, name in enumerate(names):
        shutil.copytree(backdoored["clean100"] / str(i), clean / name)
    bom = tmp_path / "bom.txt"
    bom.write_text("\n".join(names) + "\n", encoding="utf-8-sig")  # a Windows editor's BOM before class_0
    code, _, err = invoke("sanitize", backdoored["model"], "--clean", clean, "--classes", bom,
                          "--out", tmp_path / "o.safetensors", "--rounds", "0")  # fmt: skip
    assert code == 0, err
    extra = tmp_path / "extra.txt"
    extra.write_text("\n".join([*names, "class_10"]) + "\n")
    code, _, err = invoke("scan", backdoored["model"], "--clean", clean, "--classes", extra)
    assert_one_line_error(code, err, 2, "lists 11 class names but the model has 10 outputs")


@pytest.mark.parametrize("signature", ["num_classes", "num_classes=10"])
def test_user_factory_gets_the_class_count_of_the_file_and_may_import_beside_it(backdoored, tmp_path, signature):
    """A 2-class state dict without metadata: 0.3.4 called the factory with no argument (10 classes,
    or a TypeError when it has no default) and could not load it; nor could the file import a
    module beside it."""
    from ibau_cli.archs import ARCHS

    (tmp_path / "layers.py").write_text("from ibau_cli.archs.small_cnn import SmallCNN as Net\n")
    code_file = tmp_path / "mynet.py"
    code_file.write_text(f"from layers import Net\ndef build({signature}):\n    return Net(num_classes)\n")
    torch.manual_seed(0)
    weights = tmp_path / "two_class.safetensors"
    save_file(ARCHS.get("small-cnn").build(2).state_dict(), str(weights))
    clean = tmp_path / "clean"
    for c in ("0", "1"):
        shutil.copytree(backdoored["clean100"] / c, clean / c)
    code, stdout, err = invoke("sanitize", weights, "--clean", clean, "--arch", f"{code_file}:build",
                               "--out", tmp_path / "o.safetensors", "--rounds", "0", "--force", "--json", "-q")  # fmt: skip
    assert code in (0, 1), err
    assert json.loads(stdout)["model"]["num_classes"] == 2
    if signature == "num_classes":  # into a graph format: the program carries the network, reloaded without --arch
        code, _, err = invoke("sanitize", weights, "--clean", clean, "--arch", f"{code_file}:build",
                              "--out", tmp_path / "o.pt2", "--rounds", "0", "--force", "-q")  # fmt: skip
        assert code in (0, 1), err
        assert (tmp_path / "o.pt2").stat().st_size > 0


def _signalled_at_rename(when: str, signame: str) -> str:
    """A child program running the command line that sends itself ``signame`` as it is about to
    rename a finished file into place, when the condition ``when`` (on ``src``, ``dst``) holds."""
    return (
        "import os, signal, sys\n"
        # as in a terminal: a parent may have started this child with SIGINT and SIGTERM ignored
        # (pytest-xdist's workers in CI do), and a process keeps an ignored signal ignored
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
        "real = os.replace\n"
        "def replace(src, dst, *a, **k):\n"
        f"    if {when}:\n"
        f"        os.kill(os.getpid(), signal.{signame})\n"
        "    return real(src, dst, *a, **k)\n"
        "os.replace = replace\n"
        "from ibau_cli.cli import run\n"
        "run(sys.argv[1:])\n"
    )


def test_sigterm_while_the_output_is_written_exits_143_and_leaves_nothing(backdoored, tmp_path):
    """CI cancellation, `docker stop` and Kubernetes send SIGTERM: 0.3.5 died at once and left a
    hidden temporary file beside the output. The signal arrives here just before the finished
    temporary file would be renamed into place."""
    import hashlib
    import subprocess
    import sys

    child = _signalled_at_rename("'.tmp' in str(src)", "SIGTERM")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = hashlib.sha256(backdoored["model"].read_bytes()).hexdigest()
    res = subprocess.run(
        [sys.executable, "-c", child, "sanitize", str(backdoored["model"]), "--clean", str(backdoored["clean100"]),
         "--no-probes", "--set", "unlearn.rounds=1", "--out", str(out_dir / "fixed.safetensors"), "-q"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 143, res.stderr
    assert "terminated" in res.stderr and "Traceback" not in res.stderr
    assert list(out_dir.iterdir()) == []  # neither the output nor its temporary file
    assert hashlib.sha256(backdoored["model"].read_bytes()).hexdigest() == before


def test_a_run_interrupted_after_writing_the_model_leaves_none_of_its_outputs(backdoored, tmp_path):
    """A QA run's Ctrl-C while the report was written (exit 130) left the repaired model, not yet
    verified, with no report: a pipeline that looks for the model took one from a cancelled run. An
    interrupted run now removes the files it had created; a file it replaced is left as written."""
    import subprocess
    import sys

    child = _signalled_at_rename("str(dst).endswith('.json')", "SIGINT")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    res = subprocess.run(
        [sys.executable, "-c", child, "sanitize", str(backdoored["model"]), "--clean", str(backdoored["clean100"]),
         "--no-probes", "--set", "unlearn.rounds=1", "--out", str(out_dir / "fixed.safetensors"),
         "--report", str(out_dir / "r.sarif"), "--report", str(out_dir / "r.json"), "-q"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 130, res.stderr
    assert "interrupted" in res.stderr and "removed the 3 file(s) this run had written" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert list(out_dir.iterdir()) == []


def test_progress_in_a_log_is_plain_lines_only_for_long_phases():
    """A stderr that is not a terminal (CI) gets no bars; a phase longer than `first` seconds gets a
    line then, one every `every` seconds, and one at its end; short phases print nothing."""
    import io

    from rich.console import Console

    from ibau_cli.cli import _LineProgress

    now = [0.0]
    buf = io.StringIO()
    progress = _LineProgress(Console(file=buf, width=200), first=30, every=60, clock=lambda: now[0])
    progress.start("probes", 28)
    now[0] = 10
    progress.advance()
    progress.start("round 1/5: inner", 10)  # the short phase ended: no line for it
    assert buf.getvalue() == ""
    for t in (20, 45, 80, 110):  # the phase began at 10: a line at 45 (>= 40), the next at 110 (>= 105)
        now[0] = t
        progress.advance()
    progress.finish()
    assert buf.getvalue().splitlines() == [
        "ibau: round 1/5: inner: 2/10 after 35 s",
        "ibau: round 1/5: inner: 4/10 after 100 s",
        "ibau: round 1/5: inner: done in 100 s",
    ]


def test_a_gate_cannot_pass_on_a_handful_of_images(backdoored, tmp_path):
    """With 20 clean images 0.3.5 printed "PASS asr: 16.7 % (n=6)" while the true ASR was 59 %."""
    clean = tmp_path / "clean20"
    for c in range(10):
        (clean / str(c)).mkdir(parents=True)
        for img in sorted((backdoored["clean100"] / str(c)).iterdir())[:2]:
            shutil.copy(img, clean / str(c) / img.name)
    args = ["sanitize", backdoored["model"], "--clean", clean, "--trigger", backdoored["trigger"], "--target", "0",
            "--rounds", "0", "--max-acc-drop", "1", "--max-asr", "1", "--json", "-q"]  # fmt: skip
    code, stdout, err = invoke(*args, "--out", tmp_path / "a.safetensors")
    gates = {g["name"]: g for g in json.loads(stdout)["gates"]}
    assert code == 1 and gates["asr"]["status"] == "fail", gates
    assert "fewer than gate.min_samples = 10 images, too few to pass" in gates["asr"]["detail"]
    code, stdout, err = invoke(*args, "--out", tmp_path / "b.safetensors", "--set", "gate.min_samples=5")
    gates = {g["name"]: g for g in json.loads(stdout)["gates"]}
    assert gates["asr"]["status"] == "pass" and code == 0, gates  # the limits here let any value pass


def test_images_changed_to_fit_the_model_are_counted_and_the_distorting_changes_warned(backdoored, tmp_path):
    """0.3.5 turned grey images into RGB and squashed other aspect ratios without a word (a CIFAR-10
    model scored 57 % on grey copies of images it scored 67 % on in colour)."""
    from PIL import Image

    clean = tmp_path / "clean"
    shutil.copytree(backdoored["clean100"], clean)
    files = sorted(clean.glob("*/*.png"))
    for f in files[:10]:
        Image.open(f).convert("L").save(f)
    for f in files[10:15]:
        Image.open(f).resize((48, 32)).save(f)
    for f in files[15:18]:  # a print shop's CMYK JPEG
        Image.open(f).convert("CMYK").save(f.with_suffix(".jpg"))
        f.unlink()
    for f in files[20:22]:  # thumbnails, enlarged 4x or more to 32x32 (0.3.9 said nothing)
        Image.open(f).resize((8, 8)).save(f)
    code, stdout, err = invoke("sanitize", backdoored["model"], "--clean", clean, "--rounds", "0",
                               "--out", tmp_path / "o.safetensors", "--json", "-q")  # fmt: skip
    assert code in (0, 1), err
    report = json.loads(stdout)
    conversions = {
        "grey_to_rgb": 10, "resized": 7, "resized_other_aspect": 5, "cmyk_to_rgb": 3, "enlarged_4x_or_more": 2
    }  # fmt: skip
    assert report["data"]["conversions"] == conversions
    said = [w for w in report["warnings"] if "clean images" in w]
    assert any(w.startswith("2 of 100 clean images were enlarged at least 4x on a side to 32x32") for w in said)
    assert any(w.startswith("3 of 100 clean images were CMYK, converted to RGB") for w in said), said
    assert any(w.startswith("10 of 100 clean images were grey-scale") for w in said), said
    assert any(w.startswith("5 of 100 clean images had another aspect ratio") for w in said), said


def test_inputs_and_destinations_a_third_qa_pass_found(backdoored, tmp_path):
    """Each was exit 3, a silent skip or an overwritten input in 0.3.6: a class folder named with a
    non-ASCII digit ('²' passed isdigit, then int() failed); a UTF-16 --classes file; --report onto
    the --classes file (replaced it); --artifacts onto the --report path (failed after the whole run,
    the repaired model already written); a notes file beside the class folders (ignored unsaid)."""
    clean = tmp_path / "clean"
    shutil.copytree(backdoored["clean100"], clean)
    model, out = backdoored["model"], tmp_path / "fixed.safetensors"
    (clean / "9").rename(clean / "²")
    code, _, err = invoke("scan", model, "--clean", clean)
    assert_one_line_error(code, err, 2, "mix class indices")
    (clean / "²").rename(clean / "9")

    utf16 = tmp_path / "classes.txt"
    utf16.write_bytes("\n".join(str(k) for k in range(10)).encode("utf-16"))
    code, _, err = invoke("scan", model, "--clean", clean, "--classes", utf16)
    assert_one_line_error(code, err, 2, "classes.txt", "not UTF-8")

    names = tmp_path / "names.json"  # a class list with a report-like name
    names.write_text("\n".join(str(k) for k in range(10)) + "\n")
    code, _, err = invoke("sanitize", model, "--clean", clean, "--classes", names, "--out", out, "--report", names)
    assert_one_line_error(code, err, 2, "names.json", "--classes file")
    assert names.read_text().startswith("0\n1\n") and not out.exists()

    report = tmp_path / "r.json"
    code, _, err = invoke("sanitize", model, "--clean", clean, "--out", out, "--report", report, "--artifacts", report)
    assert_one_line_error(code, err, 2, "--artifacts", "--report")
    assert not out.exists() and not report.exists()

    (clean / "notes.txt").write_text("where these images came from\n")
    code, _, err = invoke("scan", model, "--clean", clean)
    assert_one_line_error(code, err, 2, "notes.txt", "not class folders")


def test_a_trigger_that_does_not_work_before_the_repair_is_warned_about(backdoored, tmp_path):
    """The right patch in the wrong corner measures an ASR near 0 and would pass the gate unremarked."""
    res = run_cli("sanitize", backdoored["model"], "--clean", backdoored["clean100"], "--out",
                  tmp_path / "fixed.safetensors", "--trigger", backdoored["trigger"], "--target", "0",
                  "--trigger-pos", "tl", "--rounds", "0", "--json", "-q", "--set", KNOWN_TRIGGER_ON)  # fmt: skip
    report = json.loads(res.stdout)
    assert report["before"]["asr"]["value"] < 0.5
    assert any("is not its trigger" in w for w in report["warnings"]), report["warnings"]
    # nor is it unlearned directly, or allowed to guide the repair (unlearn.known_trigger = "auto")
    assert report["unlearning"]["known_trigger"] is None and report["unlearning"]["guided_class"] is None


def test_a_rotated_camera_jpeg_is_read_as_a_viewer_shows_it(tmp_path):
    from PIL import Image

    from ibau_cli.images import read_image

    img = Image.new("RGB", (48, 32), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    img.save(tmp_path / "camera.jpg", exif=exif)
    shown, _, stored_size = read_image(tmp_path / "camera.jpg", "RGB")
    assert stored_size == (48, 32) and shown.size == (32, 48)


def test_a_patch_that_does_not_fit_is_described_width_by_height(backdoored, tmp_path):
    """QA24: a 32-wide, 30-high trigger was called "a 30x32 patch" in one message and "32x30" in the
    others; every size in the trigger's messages is now width x height, and says so."""
    from PIL import Image

    wide = tmp_path / "wide.png"
    Image.new("RGB", (6, 4), (255, 255, 255)).save(wide)
    code, _, err = invoke("scan", backdoored["model"], "--clean", backdoored["clean100"], "--trigger", wide,
                          "--trigger-pos", "28,0", "--target", "0")  # fmt: skip
    assert_one_line_error(code, err, 2, "a 6x4 patch does not fit a 32x32 input there (width x height)")


def test_trigger_errors_say_what_to_do(backdoored, tmp_path):
    from PIL import Image

    big = tmp_path / "big.png"
    Image.new("RGB", (40, 40), (255, 255, 255)).save(big)
    code, _, err = invoke(
        "scan", backdoored["model"], "--clean", backdoored["clean100"], "--trigger", big, "--target", "0"
    )
    assert_one_line_error(code, err, 2, "big.png", "width x height) is larger than the model input", "--trigger-mask")
    code, _, err = invoke("scan", backdoored["model"], "--clean", backdoored["clean100"], "--trigger", tmp_path,
                          "--target", "0")  # fmt: skip
    assert_one_line_error(code, err, 2, "is a folder", "give one image file")


def test_ctrl_c_after_the_run_has_finished_keeps_its_exit_code():
    """The interpreter's shutdown takes a moment with torch loaded; a Ctrl-C then (here from an
    atexit hook, after every output is written) ended 0.3.7's process by the signal, with no message
    and no exit code, after a run that had finished."""
    import subprocess
    import sys

    child = (
        "import atexit, os, signal, sys, time\n"
        "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.2)))\n"
        "from ibau_cli.cli import run\n"
        "run(sys.argv[1:])\n"
    )
    res = subprocess.run([sys.executable, "-c", child, "config", "show"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and "max_acc_drop" in res.stdout


def test_images_all_shrunk_to_an_input_size_nothing_set_are_warned(backdoored, tmp_path):
    """A QA model taking 64x64 images, shipped as TorchScript with no metadata: without --input-size
    ibau assumed 32x32 and shrank every clean image to it, with no word (0.3.7); the accuracy gate
    still passed on the shrunk images. Since 0.4.5 the size every clean image shares is the input
    size when nothing sets it (said in the model notes and as a warning). Images of several sizes leave it at
    32x32: they are then counted and warned; with --input-size, neither."""
    import warnings

    from PIL import Image

    model = tmp_path / "bare.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notices: the format is still what users ship
        torch.jit.save(torch.jit.script(backdoored["module"].eval()), str(model))

    def resized(side: int, name: str, odd_one: int):
        """The first 40 clean images at side x side, the last one at odd_one x odd_one."""
        folder = tmp_path / name
        files = sorted(backdoored["clean100"].glob("*/*.png"))[:40]
        for f in files:
            (folder / f.parent.name).mkdir(parents=True, exist_ok=True)
            size = odd_one if f == files[-1] else side
            Image.open(f).resize((size, size), Image.BICUBIC).save(folder / f.parent.name / f.name)
        return folder

    args = ["sanitize", model, "--rounds", "0", "--no-probes", "--json", "-q", "--force"]
    code, stdout, err = invoke(*args, "--clean", resized(64, "all64", 64), "--out", tmp_path / "s.ts")
    report = json.loads(stdout)
    assert report["config"]["preprocess"]["input_size"] == [64, 64], (report["gates"], report["warnings"])
    assert report["config_layers"][:2] == ["defaults", "the model and the clean images"], report["config_layers"]
    assert any("input shape 3x64x64 read from the model and the clean images" in n for n in report["model"]["notes"])
    assert not report["data"]["conversions"] and not any("at least twice" in w for w in report["warnings"])
    # said as a warning too: a model trained at 32x32 given 64x64 images would run at 64x64
    assert any(
        w.startswith("the model's input size, 64x64, is the size of every clean image") for w in report["warnings"]
    )
    clean = resized(64, "clean64", 66)
    code, stdout, err = invoke(*args, "--clean", clean, "--out", tmp_path / "a.ts")
    report = json.loads(stdout)
    assert report["data"]["conversions"]["shrunk_2x_or_more"] == 40, report["data"]
    assert any(w.startswith("all 40 clean images are at least twice 32x32") for w in report["warnings"]), report
    code, stdout, err = invoke(*args, "--clean", clean, "--out", tmp_path / "b.ts", "--input-size", "64x64")
    assert not any("at least twice" in w for w in json.loads(stdout)["warnings"])
    # less than twice (a QA model trained at 40x40, 0.4.0: counted as "resized" and nothing more)
    clean40 = resized(40, "clean40", 41)
    code, stdout, err = invoke(*args, "--clean", clean40, "--out", tmp_path / "c.ts")
    warned = [w for w in json.loads(stdout)["warnings"] if w.startswith("all 40 clean images were resized to 32x32")]
    assert len(warned) == 1 and "is 40x40" in warned[0] and "--input-size" in warned[0], stdout
    code, stdout, err = invoke(*args, "--clean", clean40, "--out", tmp_path / "d.ts", "--input-size", "40x40")
    assert not any("were resized" in w for w in json.loads(stdout)["warnings"])


def test_strict_fails_a_run_whose_gate_could_not_be_evaluated(backdoored, tmp_path):
    """No --trigger and --no-probes: nothing measures an ASR (not_evaluated, exit 0 with a warning);
    --strict (gate.strict) makes that a failed run for a registry that must fail closed."""
    args = ["sanitize", backdoored["model"], "--clean", backdoored["clean100"], "--rounds", "0", "--json", "-q"]
    code, stdout, err = invoke(*args, "--out", tmp_path / "a.safetensors")
    gates = {g["name"]: g["status"] for g in json.loads(stdout)["gates"]}
    assert code == 0 and gates["asr"] == "not_evaluated", (gates, err)
    code, stdout, err = invoke(*args, "--out", tmp_path / "b.safetensors", "--strict")
    report = json.loads(stdout)
    assert code == 1 and report["verdict"] == "fail" and report["config"]["gate"]["strict"] is True, err


def test_copies_in_the_clean_folder_are_said_and_kept_off_the_held_out_side(backdoored, tmp_path):
    clean = tmp_path / "clean"
    shutil.copytree(backdoored["clean100"], clean)
    for f in sorted(clean.glob("*/*.png")):
        shutil.copy(f, f.with_name("copy_" + f.name))
    shutil.copy(next(iter(sorted((clean / "1").glob("*.png")))), clean / "2" / "mislabelled.png")
    nines = sorted((clean / "9").glob("*.png"))
    for f in nines[1:]:  # class 9: twenty copies of one image, none left to hold out
        shutil.copy(nines[0], f)
    code, stdout, err = invoke("sanitize", backdoored["model"], "--clean", clean, "--rounds", "0", "--no-probes",
                               "--out", tmp_path / "o.safetensors", "--json", "-q")  # fmt: skip
    report = json.loads(stdout)
    said = [w for w in report["warnings"] if "exact copies" in w]
    assert len(said) == 1 and said[0].startswith("110 of 201 clean images"), report["warnings"]
    assert any(w.startswith("1 class(es) have no held-out image (9)") for w in report["warnings"])
    assert any("stored under two classes" in w and "mislabelled.png" in w for w in report["warnings"])
    held = set(report["data"]["holdout_files"])
    assert len(held) == report["data"]["n_holdout"] > 0
    for f in held - {"2/mislabelled.png"}:  # each held-out image's copy is held out too
        folder, name = f.split("/")
        partner = f"{folder}/{name.removeprefix('copy_')}" if name.startswith("copy_") else f"{folder}/copy_{name}"
        assert partner in held, (f, partner)


def test_a_run_that_fails_after_writing_some_outputs_removes_them(backdoored, tmp_path):
    """A full disk under the second of three reports (a QA pass, on a 64 KiB tmpfs): 0.4.5 exited 3
    and left the model and the first report, which said "pass". A failing run now removes the
    outputs it created, as an interrupted one does; here the SARIF writer fails as a full disk would."""
    import subprocess
    import sys

    out, first, second = tmp_path / "o.safetensors", tmp_path / "r.json", tmp_path / "r.sarif"
    args = ["sanitize", str(backdoored["model"]), "--clean", str(backdoored["clean100"]), "--rounds", "0",
            "--no-probes", "-q", "--out", str(out), "--report", str(first), "--report", str(second)]  # fmt: skip
    child = f"""
import errno, sys
import ibau_cli.reporters as reporters
real = reporters.render
def render(fmt, data, images):
    if fmt == "sarif":
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(fmt, data, images)
reporters.render = render
from ibau_cli.cli import run
run({args!r})
"""
    res = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert res.returncode == 3, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and "No space left on device" in lines[0], res.stderr
    assert lines[1].startswith("removed the 2 file(s) this run had written"), res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_nothing_at_the_top_of_the_clean_folder_is_skipped_unsaid(backdoored, tmp_path):
    """A QA pass: a dangling link named like a class folder, and a class folder renamed '.9', were
    skipped without a word in 0.4.5."""
    clean = tmp_path / "clean"
    shutil.copytree(backdoored["clean100"], clean)
    (clean / "10").symlink_to(tmp_path / "gone")
    code, _, err = invoke("sanitize", backdoored["model"], "--clean", clean, "--out", tmp_path / "o.safetensors")
    assert_one_line_error(code, err, 2, "neither a folder nor a file", "10")
    (clean / "10").unlink()
    shutil.copytree(clean / "9", clean / ".9")
    code, stdout, err = invoke("sanitize", backdoored["model"], "--clean", clean, "--rounds", "0", "--no-probes",
                               "--out", tmp_path / "o.safetensors", "--json", "-q")  # fmt: skip
    said = [w for w in json.loads(stdout)["warnings"] if w.startswith("hidden folder(s)")]
    assert len(said) == 1 and "(.9)" in said[0], err
