#!/usr/bin/env python
"""Model-registry hook: scan every new model in an incoming folder, move failures to quarantine.

    python examples/registry_hook.py INCOMING --clean CLEAN_DIR [--approved DIR] [--quarantine DIR]
        [--originals DIR] [--sanitize] [-- EXTRA IBAU ARGS...]

For each model file in INCOMING (safetensors, TorchScript, .pt2, ONNX, checkpoints), oldest first:
- ``ibau scan`` (or, with ``--sanitize``, ``ibau sanitize``) runs with a JSON report;
- exit 0 (passed): the model and its report move to APPROVED (default INCOMING/../approved); with
  ``--sanitize`` only the repaired model goes there, beside the report, and the input model (the
  one that was repaired, so possibly backdoored) moves to ORIGINALS (default INCOMING/../originals);
- exit 1 (gate failed: a backdoor is suspected or the ASR is past the limit), 2 (bad input) or 3
  (runtime failure): the model and what ibau said move to QUARANTINE (default
  INCOMING/../quarantine); nothing is ever deleted. An ONNX model's external-data files move with it.
A ``hook-log.jsonl`` line is appended per model (time, file, sha256, exit code, outcome, verdict).
The hook's own exit code is 1 when any model was quarantined, else 0 — so it can gate a cron job or
a CI step too. Everything after ``--`` is passed to ibau unchanged (e.g. ``-- --preset cifar10``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ibau_cli.formats import sha256_file

MODEL_SUFFIXES = {".safetensors", ".pt", ".pth", ".ckpt", ".bin", ".pt2", ".onnx", ".ts", ".jit"}
OUTCOMES = {0: "approved", 1: "quarantined: gate failed", 2: "quarantined: bad input", 3: "quarantined: ibau failed"}


def _move(src: Path, folder: Path) -> Path:
    """Move without overwriting: an existing name gets a numbered suffix."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / src.name
    n = 1
    while dest.exists():
        dest = folder / f"{src.stem}.{n}{src.suffix}"
        n += 1
    shutil.move(str(src), str(dest))
    return dest


def _companions(model: Path) -> list[Path]:
    """Files a model needs beside it: an ONNX graph's external-data files (``model.onnx.data``...)."""
    if model.suffix.lower() != ".onnx":
        return []
    try:
        import onnx

        proto = onnx.load(str(model), load_external_data=False)
    except Exception:
        return []
    names = set()
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            names |= {entry.value for entry in tensor.external_data if entry.key == "location"}
    return [model.parent / n for n in sorted(names) if (model.parent / n).is_file()]


def process(model: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    work = args.quarantine.parent / ".ibau-hook-work"
    work.mkdir(parents=True, exist_ok=True)
    report = work / f"{model.name}.report.json"
    cmd = [*args.ibau, "sanitize" if args.sanitize else "scan", str(model), "--clean", str(args.clean)]
    cmd += ["--report", str(report), "--quiet"]
    repaired = None
    if args.sanitize:
        repaired = work / f"{model.stem}.sanitized{model.suffix}"
        cmd += ["--out", str(repaired)]
    digest = sha256_file(model)
    for leftover in (report, repaired):  # from a hook run that was killed: never mistake it for this one's
        if leftover is not None:
            leftover.unlink(missing_ok=True)
    started = time.time()
    res = subprocess.run([*cmd, *extra], capture_output=True, text=True)
    code = res.returncode if res.returncode in OUTCOMES else 3
    folder = args.approved if code == 0 else args.quarantine
    # a repaired model is approved, not its input: that goes to the originals folder
    model_folder = args.originals if code == 0 and args.sanitize else folder
    companions = _companions(model)
    dest = _move(model, model_folder)
    stranded = []
    for companion in companions:  # moved under their own names: the graph refers to them by name
        if (dest.parent / companion.name).exists():  # never overwrite: leave it, and say so in the log
            stranded.append(companion.name)
        else:
            shutil.move(str(companion), str(dest.parent / companion.name))
    verdict = None
    if report.exists():
        verdict = json.loads(report.read_text()).get("verdict")
        _move(report, folder)
    else:  # ibau stopped before a report (exit 2/3): keep what it said instead
        (folder / f"{dest.name}.error.txt").write_text(res.stderr)
    repaired_dest = _move(repaired, folder) if repaired is not None and repaired.exists() else None
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "file": model.name,
        "sha256": digest,
        "exit_code": res.returncode,
        "outcome": OUTCOMES[code],
        "verdict": verdict,
        "moved_to": str(dest),
        "approved": None if code != 0 else str(repaired_dest or dest),
        **({"companions_not_moved": stranded} if stranded else {}),
        "seconds": round(time.time() - started, 1),
        "message": res.stderr.strip().splitlines()[-1] if code in (2, 3) and res.stderr.strip() else None,
    }
    with open(args.log, "a") as fh:
        fh.write(json.dumps(entry) + "\n")
    return entry


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("incoming", type=Path)
    ap.add_argument("--clean", type=Path, required=True, help="clean images, DIR/<class>/<image>")
    ap.add_argument("--approved", type=Path)
    ap.add_argument("--quarantine", type=Path)
    ap.add_argument("--originals", type=Path, help="with --sanitize: where repaired inputs go [INCOMING/../originals]")
    ap.add_argument("--log", type=Path, help="default: INCOMING/../hook-log.jsonl")
    ap.add_argument("--sanitize", action="store_true", help="repair with I-BAU instead of scanning only")
    ap.add_argument("--ibau", nargs="+", default=[sys.executable, "-m", "ibau_cli"], help="how to run ibau")
    args = ap.parse_args(argv)
    if not args.incoming.is_dir():
        print(f"error: incoming folder not found: {args.incoming}", file=sys.stderr)
        return 2
    root = args.incoming.resolve().parent
    args.approved = args.approved or root / "approved"
    args.quarantine = args.quarantine or root / "quarantine"
    args.originals = args.originals or root / "originals"
    args.log = args.log or root / "hook-log.jsonl"
    models = sorted(
        (p for p in args.incoming.iterdir() if p.is_file() and p.suffix.lower() in MODEL_SUFFIXES),
        key=lambda p: p.stat().st_mtime,
    )
    quarantined = 0
    for model in models:
        entry = process(model, args, extra)
        quarantined += entry["exit_code"] != 0
        print(f"{entry['file']}: {entry['outcome']} ({entry['seconds']} s) -> {entry['moved_to']}")
    print(f"{len(models)} model(s): {len(models) - quarantined} approved, {quarantined} quarantined")
    return 1 if quarantined else 0


if __name__ == "__main__":
    raise SystemExit(main())
