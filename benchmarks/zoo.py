#!/usr/bin/env python
"""Train a zoo of backdoored (and clean) image classifiers on real CIFAR-10 / GTSRB data.

Run from the repository root with ``PYTHONPATH=.``::

    python benchmarks/zoo.py train --name cifar10-smallvgg-badnets --dataset cifar10 \\
        --arch small-vgg --attack badnets --target 0 --poison-ratio 0.1 --epochs 12 --seed 0 --threads 1
    python benchmarks/zoo.py export-clean --dataset cifar10 --n 1000 --offset 0 --seed 0 --out /tmp/clean

``train`` writes ``OUT/NAME/ckpt.pt`` after every epoch and resumes from it when it is present (so a
killed run is restarted with the same command). When training is done it evaluates clean accuracy and
attack success rate on the test split and writes ``OUT/NAME/model.safetensors`` (state dict plus
``ibau.*`` metadata), the same model as ``model.onnx``, ``model.torchscript.pt`` and ``model.pt`` (a
checkpoint), and ``OUT/NAME/manifest.json`` (metrics and everything needed to reproduce).
The trigger, where it has a file form, is written to ``OUT/NAME/trigger.png`` at the start.
``--amp bf16`` runs the training steps under bf16 autocast (2x faster than fp32 for PreAct-ResNet-18
on this AVX-512 BF16 CPU); the evaluation stays in fp32.

``OUT`` is ``--out-dir``, else ``$IBAU_ZOO_DIR``, else ``~/.cache/ibau-zoo``. The data folder is
``--data``, else ``$IBAU_DATA``, else ``../shared/data`` relative to the repository root; it holds
``<dataset>/{train,test}.npz`` (uint8 NHWC images, int64 labels). Data are never copied.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import socket
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import attacks  # noqa: E402  (benchmarks/attacks.py)

from ibau_cli.formats import sha256_file  # noqa: E402
from ibau_cli.preprocess import Normalized  # noqa: E402

DATASETS = {
    "cifar10": {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616], "flip": True},
    "gtsrb": {"mean": [0.3403, 0.3121, 0.3214], "std": [0.2724, 0.2608, 0.2669], "flip": False},
}
FORMAT_VERSION = "1"
CKPT_VERSION = 1


def log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def default_data_dir() -> Path:
    env = os.environ.get("IBAU_DATA")
    return Path(env) if env else (REPO_ROOT / ".." / "shared" / "data").resolve()


def default_out_dir() -> Path:
    env = os.environ.get("IBAU_ZOO_DIR")
    return Path(env).expanduser() if env else Path("~/.cache/ibau-zoo").expanduser()


def load_split(data_dir: Path, dataset: str, split: str) -> tuple[np.ndarray, np.ndarray, list[str], Path]:
    path = data_dir / dataset / f"{split}.npz"
    if not path.is_file():
        sys.exit(f"error: {path} not found (set --data or IBAU_DATA)")
    with np.load(path, allow_pickle=False) as d:
        x, y = d["images"], d["labels"].astype(np.int64)
        classes = [str(c) for c in d["classes"]] if "classes" in d.files else [str(i) for i in range(int(y.max()) + 1)]
    if x.ndim != 4 or x.dtype != np.uint8:
        sys.exit(f"error: {path}: expected uint8 NHWC images, got {x.dtype} {x.shape}")
    return x, y, classes, path


def arrays_sha256(path: Path) -> dict[str, str]:
    """sha256 of the ``images`` and ``labels`` arrays' bytes (C order) in a split's .npz."""
    import hashlib

    with np.load(path, allow_pickle=False) as d:
        return {k: hashlib.sha256(np.ascontiguousarray(d[k]).tobytes()).hexdigest() for k in ("images", "labels")}


def to_float(x_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1]."""
    t = torch.as_tensor(x_uint8)
    return t.permute(0, 3, 1, 2).float().div_(255.0)


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """float NCHW in [0, 1] -> uint8 NHWC (rounded, as if stored as PNG)."""
    return (x.clamp(0, 1) * 255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def triggered_uint8(attack: str, x_uint8: np.ndarray, seed: int, chunk: int = 2048) -> np.ndarray:
    out = np.empty_like(x_uint8)
    for i in range(0, len(x_uint8), chunk):
        out[i : i + chunk] = to_uint8_nhwc(attacks.apply(attack, to_float(x_uint8[i : i + chunk]), seed))
    return out


def write_folder(x: np.ndarray, y: np.ndarray, root: Path, names: list[str] | None = None) -> None:
    """Write uint8 NHWC images as PNGs in the ImageFolder layout ``root/<label:02d>/<name>.png``
    (names default to 00000, 00001, ...); one-channel images are written as grey-scale."""
    from PIL import Image

    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        d = Path(root) / f"{int(label):02d}"
        d.mkdir(parents=True, exist_ok=True)
        name = names[i] if names is not None else f"{i:05d}"
        Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(d / f"{name}.png")


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Normalize(torch.nn.Module):
    def __init__(self, mean, std) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std


def augment(x: torch.Tensor, gen: torch.Generator, flip: bool, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding, plus (optionally) random horizontal flip; x in [0, 1]."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    offs = torch.randint(0, 2 * pad + 1, (b, 2), generator=gen).tolist()
    out = torch.stack([padded[i, :, oy : oy + h, ox : ox + w] for i, (oy, ox) in enumerate(offs)])
    if flip:
        m = torch.rand(b, generator=gen) < 0.5
        out[m] = out[m].flip(3)
    return out


@torch.no_grad()
def predict(model, norm, x_uint8: np.ndarray, batch: int = 500) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    preds = []
    for i in range(0, len(x_uint8), batch):
        xb = norm(to_float(x_uint8[i : i + batch]).to(device)).contiguous(memory_format=torch.channels_last)
        preds.append(model(xb).argmax(1).cpu().numpy())
    return np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)


def build_config(args, n_total_train: int, num_classes: int) -> dict:
    return {
        "name": args.name,
        "dataset": args.dataset,
        "arch": args.arch,
        "attack": args.attack,
        "target": None if args.attack in ("clean", "all2all") else args.target,
        "poison_ratio": 0.0 if args.attack == "clean" else args.poison_ratio,
        "epochs": args.epochs,
        "train_subset": args.train_subset,
        "seed": args.seed,
        "trigger_seed": args.trigger_seed,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "momentum": 0.9,
        "weight_decay": args.weight_decay,
        "warmup_steps": args.warmup_steps,
        "num_classes": num_classes,
        "n_total_train": n_total_train,
        **({"amp": args.amp} if args.amp != "off" else {}),  # absent when off: older checkpoints still resume
    }


def cmd_train(args) -> int:
    t_start = time.time()
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    from ibau_cli.archs import ARCHS

    spec = ARCHS.get(args.arch)
    if spec is None:
        sys.exit(f"error: unknown arch {args.arch!r}; known: {', '.join(ARCHS.names())}")
    ds = DATASETS[args.dataset]
    data_dir = Path(args.data).expanduser().resolve()
    run_dir = Path(args.out_dir).expanduser() / args.name
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "ckpt.pt"
    log(f"run dir {run_dir}; data {data_dir}; threads {args.threads}")

    x_tr, y_tr, classes, tr_path = load_split(data_dir, args.dataset, "train")
    x_te, y_te, _, te_path = load_split(data_dir, args.dataset, "test")
    num_classes = len(classes)
    if args.attack not in ("clean", "all2all") and not 0 <= args.target < num_classes:
        sys.exit(f"error: --target {args.target} outside 0..{num_classes - 1}")
    h, w = x_tr.shape[1:3]
    if spec.input_size is None:
        sys.exit(f"error: {args.arch} declares no input size; the zoo trains built-in architectures")
    if (h, w) != tuple(spec.input_size):
        sys.exit(f"error: images are {h}x{w} but {args.arch} expects {spec.input_size}")
    config = build_config(args, len(y_tr), num_classes)

    # --- training set: seeded subset, then seeded poisoning of the stored (uint8) images ---
    perm = np.random.default_rng([args.seed, 0]).permutation(len(y_tr))
    if args.train_subset:
        if not 0 < args.train_subset <= len(y_tr):
            sys.exit(f"error: --train-subset must be in 1..{len(y_tr)}")
        perm = perm[: args.train_subset]
    x_tr, y_tr = x_tr[perm], y_tr[perm]
    n_train = len(y_tr)
    poison_idx = np.zeros(0, dtype=np.int64)
    if args.attack != "clean" and args.poison_ratio > 0:
        candidates = (
            np.flatnonzero(y_tr != args.target) if attacks.is_single_target(args.attack) else np.arange(n_train)
        )
        n_poison = min(int(round(args.poison_ratio * n_train)), len(candidates))
        poison_idx = np.sort(np.random.default_rng([args.seed, 1]).choice(candidates, n_poison, replace=False))
        x_tr = x_tr.copy()
        x_tr[poison_idx] = triggered_uint8(args.attack, x_tr[poison_idx], args.trigger_seed)
        y_tr = y_tr.copy()
        y_tr[poison_idx] = attacks.target_labels(
            args.attack, torch.from_numpy(y_tr[poison_idx]), args.target, num_classes
        ).numpy()
    log(
        f"{args.dataset}: {n_train} train images ({len(poison_idx)} poisoned with {args.attack}), "
        f"{len(y_te)} test images, {num_classes} classes"
    )
    trigger_info = attacks.trigger_files(
        args.attack, run_dir, seed=args.trigger_seed, size=(h, w), channels=x_tr.shape[3]
    )

    # --- model / optimiser / schedule ---
    torch.manual_seed(args.seed)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model = spec.build(num_classes).to(device, memory_format=torch.channels_last)  # ~15% faster on CPU
    norm = Normalize(ds["mean"], ds["std"]).to(device)
    log(f"device {device}")
    steps_per_epoch = math.ceil(n_train / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    warmup = min(args.warmup_steps, total_steps)

    def lr_factor(s: int) -> float:  # linear warm-up (the net diverges at lr 0.05 without it), cosine to 0
        w = min(1.0, (s + 1) / warmup) if warmup else 1.0
        return w * 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(args.seed + 12345)
    start_epoch, history, train_seconds, runs = 0, [], 0.0, []

    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ck.get("config") != config:
            diff = {k: (ck.get("config", {}).get(k), v) for k, v in config.items() if ck.get("config", {}).get(k) != v}
            sys.exit(
                f"error: {ckpt_path} was made with different settings {diff} (old, new); "
                f"use another --name or delete the folder"
            )
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        gen.set_state(ck["gen_state"])
        torch.set_rng_state(ck["torch_rng_state"])
        start_epoch, history = ck["epoch"], ck["history"]
        train_seconds, runs = ck["train_seconds"], ck["runs"]
        log(f"resumed from {ckpt_path} at epoch {start_epoch}/{args.epochs}")
    runs.append(
        {
            "argv": sys.argv,
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "start_epoch": start_epoch,
        }
    )

    x_tr_t = torch.from_numpy(x_tr)  # uint8 NHWC, shared memory with numpy
    y_tr_t = torch.from_numpy(y_tr)
    for epoch in range(start_epoch, args.epochs):
        model.train()
        t0 = time.time()
        order = torch.randperm(n_train, generator=gen)
        tot_loss, tot_correct, seen = 0.0, 0, 0
        for step in range(steps_per_epoch):
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            xb = augment(to_float(x_tr_t[idx]), gen, ds["flip"]).to(device, non_blocking=True)
            yb = y_tr_t[idx].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
                out = model(norm(xb).contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(out.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += loss.item() * len(yb)
            tot_correct += (out.argmax(1) == yb).sum().item()
            seen += len(yb)
            if args.log_every and (step + 1) % args.log_every == 0:
                log(
                    f"  epoch {epoch + 1} step {step + 1}/{steps_per_epoch} loss {tot_loss / seen:.4f} "
                    f"acc {tot_correct / seen:.4f} ({time.time() - t0:.0f}s)"
                )
        dt = time.time() - t0
        train_seconds += dt
        history.append(
            {
                "epoch": epoch + 1,
                "loss": tot_loss / seen,
                "train_acc": tot_correct / seen,
                "lr_end": sched.get_last_lr()[0],
                "seconds": round(dt, 1),
            }
        )
        atomic_torch_save(
            {
                "version": CKPT_VERSION,
                "config": config,
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "gen_state": gen.get_state(),
                "torch_rng_state": torch.get_rng_state(),
                "history": history,
                "train_seconds": train_seconds,
                "runs": runs,
            },
            ckpt_path,
        )
        log(
            f"epoch {epoch + 1}/{args.epochs} loss {tot_loss / seen:.4f} train acc {tot_correct / seen:.4f} "
            f"{dt:.1f}s; checkpoint saved"
        )

    # --- evaluation on the test split ---
    log("evaluating")
    t_eval = time.time()
    pred = predict(model, norm, x_te)
    clean_acc = float((pred == y_te).mean())
    asr, n_asr = None, 0
    if args.attack != "clean":
        sel = np.flatnonzero(y_te != args.target) if attacks.is_single_target(args.attack) else np.arange(len(y_te))
        x_bd = triggered_uint8(args.attack, x_te[sel], args.trigger_seed)
        want = attacks.target_labels(args.attack, torch.from_numpy(y_te[sel]), args.target, num_classes).numpy()
        asr = float((predict(model, norm, x_bd) == want).mean())
        n_asr = len(sel)
    eval_seconds = time.time() - t_eval
    log(f"clean acc {clean_acc:.4f} ({len(y_te)} images); ASR {asr if asr is None else f'{asr:.4f}'} ({n_asr} images)")

    # --- model.safetensors ---
    from safetensors.torch import save_file

    preprocess = {"input_size": [int(h), int(w)], "channels": int(x_tr.shape[3]), "mean": ds["mean"], "std": ds["std"]}
    metadata = {
        "ibau.arch": args.arch,
        "ibau.num_classes": str(num_classes),
        "ibau.preprocess": json.dumps(preprocess),
        "ibau.format_version": FORMAT_VERSION,
    }
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    model_path = run_dir / "model.safetensors"
    tmp = run_dir / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o644)
    os.replace(tmp, model_path)

    # --- manifest.json ---
    manifest = {
        "name": args.name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "dataset": args.dataset,
        "classes": classes,
        "arch": args.arch,
        "num_classes": num_classes,
        "attack": args.attack,
        "target": config["target"],
        "poison_ratio": config["poison_ratio"],
        "n_poisoned": int(len(poison_idx)),
        "trigger": trigger_info,
        "trigger_seed": args.trigger_seed,
        "trigger_applied": "in [0,1] pixel space before normalisation; triggered images rounded to uint8",
        "seed": args.seed,
        "epochs": args.epochs,
        "train_subset": args.train_subset,
        "n_train": n_train,
        "training": {
            "optimizer": "SGD",
            "lr": args.lr,
            "momentum": 0.9,
            "weight_decay": args.weight_decay,
            "schedule": f"per step: linear warm-up over {warmup} steps times cosine from lr to 0 over "
            f"{total_steps} steps",
            "warmup_steps": warmup,
            "batch_size": args.batch_size,
            "augmentation": "random crop 32 with 4-px zero padding" + (" + horizontal flip" if ds["flip"] else ""),
            "threads": args.threads,
            "amp": args.amp,
            "history": history,
        },
        "preprocess": preprocess,
        "metrics": {
            "clean_acc": clean_acc,
            "n_clean": int(len(y_te)),
            "asr": asr,
            "n_asr": int(n_asr),
            "asr_definition": (
                None
                if asr is None
                else "fraction of triggered test images predicted as (label+1)%num_classes"
                if args.attack == "all2all"
                else "fraction of triggered test images with true label != target predicted as target"
            ),
        },
        "files": {
            "model": "model.safetensors",
            "model_sha256": sha256_file(model_path),
            "trigger": trigger_info.get("file"),
        },
        "safetensors_metadata": metadata,
        "reproduce": {
            "command": shlex.join(["python"] + sys.argv),
            "cwd": os.getcwd(),
            "runs": runs,
            "data_dir": str(data_dir),
            "data_files": {
                f"{args.dataset}/train.npz": sha256_file(tr_path),
                f"{args.dataset}/test.npz": sha256_file(te_path),
            },
            # the arrays' own hashes, equal wherever the same images are re-packed (the .npz bytes are not)
            "data_arrays": {
                f"{args.dataset}/{split}": arrays_sha256(path)
                for split, path in (("train", tr_path), ("test", te_path))
            },
            "subset_rng": "np.random.default_rng([seed, 0]).permutation(n)[:train_subset]",
            "poison_rng": "np.random.default_rng([seed, 1]).choice(candidates, n_poison, replace=False)",
        },
        "env": {
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "host": socket.gethostname(),
        },
        "wall_seconds": {
            "train": round(train_seconds, 1),
            "eval": round(eval_seconds, 1),
            "this_run": round(time.time() - t_start, 1),
        },
    }
    atomic_write_text(json.dumps(manifest, indent=2) + "\n", run_dir / "manifest.json")
    log(f"wrote {model_path} and {run_dir / 'manifest.json'}")
    log(f"also wrote {', '.join(export_formats(run_dir).values())}")
    return 0


EXPORT_FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "checkpoint": "model.pt"}


def export_formats(run_dir: Path) -> dict[str, str]:
    """Write the run's model in every other format the tool reads, beside model.safetensors,
    and record them (with their sha256) in the manifest. Returns format -> file name."""
    from ibau_cli.formats import load_model, save_model

    loaded = load_model(run_dir / "model.safetensors")
    manifest_path = run_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    written = {}
    for fmt, name in EXPORT_FORMATS.items():
        if fmt == "onnx":  # a third-party ONNX file: pixels in [0, 1] in, normalisation inside the graph
            _export_onnx(Normalized(loaded.module, loaded.preprocess).eval(), run_dir / name, manifest)
        else:
            save_model(loaded.module, run_dir / name, fmt=fmt, arch=loaded.arch,
                       num_classes=manifest["num_classes"], preprocess=loaded.preprocess)  # fmt: skip
        written[fmt] = name
        manifest["files"][f"model_{fmt}"] = name
        manifest["files"][f"model_{fmt}_sha256"] = sha256_file(run_dir / name)
    atomic_write_text(json.dumps(manifest, indent=2) + "\n", manifest_path)
    return written


def _export_onnx(module: torch.nn.Module, path: Path, manifest: dict) -> None:
    import warnings

    from ibau_cli.formats.base import write_atomically

    c, h, w = manifest["preprocess"].get("channels", 3), *manifest["preprocess"].get("input_size", (32, 32))

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (torch.rand(2, c, h, w),), str(tmp), dynamo=False, opset_version=17,
                              input_names=["image"], output_names=["scores"],
                              dynamic_axes={"image": {0: "batch"}, "scores": {0: "batch"}})  # fmt: skip

    write_atomically(path, write)


def cmd_export_formats(args) -> int:
    for run in args.runs:
        run_dir = Path(run)
        if not (run_dir / "model.safetensors").is_file() or not (run_dir / "manifest.json").is_file():
            print(f"zoo.py: {run_dir}: not a finished zoo run (model.safetensors and manifest.json)", file=sys.stderr)
            return 2
        written = export_formats(run_dir)
        print(f"{run_dir.name}: {', '.join(written.values())}")
    return 0


def cmd_export_clean(args) -> int:

    data_dir = Path(args.data).expanduser().resolve()
    x, y, classes, _ = load_split(data_dir, args.dataset, args.split)
    perm = np.random.default_rng(args.seed).permutation(len(y))
    if args.offset < 0 or args.n <= 0 or args.offset + args.n > len(y):
        sys.exit(f"error: --offset {args.offset} + --n {args.n} exceeds the {len(y)} {args.split} images")
    out = Path(args.out).expanduser()
    positions = range(args.offset, args.offset + args.n)
    chosen = perm[list(positions)]
    write_folder(x[chosen], y[chosen], out, names=[str(pos) for pos in positions])
    counts = np.bincount(y[chosen], minlength=len(classes))
    missing = [c for c in range(len(classes)) if counts[c] == 0]
    print(
        f"wrote {args.n} {args.dataset} {args.split} images (permutation seed {args.seed}, positions "
        f"{args.offset}..{args.offset + args.n - 1}) to {out}"
    )
    if missing:
        print(f"warning: no images of classes {missing}; folder-based class indices may shift", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="zoo.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train (or resume) one model")
    t.add_argument("--name", required=True)
    t.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    t.add_argument("--arch", default="small-vgg")
    t.add_argument("--attack", choices=attacks.ATTACKS, required=True)
    t.add_argument("--target", type=int, default=0)
    t.add_argument("--poison-ratio", type=float, default=0.1)
    t.add_argument("--epochs", type=int, required=True)
    t.add_argument("--train-subset", type=int, default=None, help="train on N images of a seeded permutation")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--trigger-seed", type=int, default=0, help="seed of the blend noise / WaNet grid")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument(
        "--amp",
        choices=["off", "bf16"],
        default="off",
        help="bf16 autocast for the training steps (2x faster on a CPU with AVX-512 BF16); evaluation stays fp32",
    )
    t.add_argument("--lr", type=float, default=0.05)
    t.add_argument("--weight-decay", type=float, default=5e-4)
    t.add_argument("--warmup-steps", type=int, default=200, help="linear lr warm-up steps (0: none)")
    t.add_argument("--log-every", type=int, default=50, help="log every N steps (0: only per epoch)")
    t.add_argument("--data", default=str(default_data_dir()), help="default: $IBAU_DATA or ../shared/data")
    t.add_argument("--out-dir", default=str(default_out_dir()), help="default: $IBAU_ZOO_DIR or ~/.cache/ibau-zoo")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export-clean", help="write test images as PNG in an ImageFolder layout")
    e.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    e.add_argument("--split", choices=["test", "train"], default="test")
    e.add_argument("--n", type=int, required=True)
    e.add_argument("--offset", type=int, default=0)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", required=True)
    e.add_argument("--data", default=str(default_data_dir()), help="default: $IBAU_DATA or ../shared/data")
    e.set_defaults(func=cmd_export_clean)

    f = sub.add_parser("export-formats", help="write finished runs' models as ONNX, TorchScript and a checkpoint too")
    f.add_argument("runs", nargs="+", help="zoo run folders (model.safetensors + manifest.json)")
    f.set_defaults(func=cmd_export_formats)

    args = p.parse_args(argv)
    if args.cmd == "train" and args.epochs < 1:
        p.error("--epochs must be >= 1")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
