"""Every Ray job config in jobs/ is a valid config for its tool."""

from __future__ import annotations

from pathlib import Path

import pytest

from pairgen.config import load_config

JOBS = Path(__file__).resolve().parents[1] / "jobs"


# Flow-matching (SD3, FLUX) teachers by hub id: their solver is flow_euler; FLUX runs in bf16 (it overflows in fp16).
FLOW_TEACHERS = ("stabilityai/stable-diffusion-3", "black-forest-labs/FLUX.1")


@pytest.mark.parametrize("path", sorted(JOBS.glob("pairgen_*.yaml")), ids=lambda p: p.name)
def test_pairgen_job_configs_validate(path):
    config = load_config(str(path))
    assert config.out.startswith("s3://") and config.num_pairs >= 1_000_000
    flow = config.teacher.startswith(FLOW_TEACHERS)
    assert config.dtype == ("bf16" if "FLUX" in config.teacher else "fp16") and config.workers > 1
    assert config.scheduler == ("flow_euler" if flow else "ddim")


def test_there_are_job_configs():
    assert len(list(JOBS.glob("*.yaml"))) >= 3


@pytest.mark.parametrize("path", sorted(JOBS.glob("distill_*.yaml")), ids=lambda p: p.name)
def test_distill_job_configs_validate(path):
    from distill.train_config import load_train_config

    config = load_train_config(str(path))
    assert config.data.startswith("s3://") and config.out.startswith("s3://")
    assert config.workers > 1 and config.amp == "bf16" and config.use_gpu


PACKAGE_DATA = {".py", ".safetensors", ".json", ".txt", ".yaml"}


def _distribution_packages() -> list[str]:
    """Top-level packages the distribution ships (pyproject's packages.find include patterns)."""
    import tomllib

    config = tomllib.loads((JOBS.parent / "pyproject.toml").read_text())
    return [p.rstrip("*") for p in config["tool"]["setuptools"]["packages"]["find"]["include"]]


def test_worker_image_copies_and_checks_every_package():
    """The image's `pip install .` sees only what docker/Dockerfile copies: a package missing there
    (as `d2g/` was after the layout move) installs an image whose every job fails on import."""
    import re

    dockerfile = (JOBS.parent / "docker" / "Dockerfile").read_text()
    copied = {m.group(1) for m in re.finditer(r"(?m)^COPY\s+(?:--\S+\s+)*(\S+)\s+\./", dockerfile)}
    check = re.search(r"python -c \"import ([^;]+);", dockerfile)
    assert check, "the image has no import check"
    imported = {name.strip() for name in check.group(1).split(",")}
    for package in _distribution_packages():
        assert package in copied, f"docker/Dockerfile does not COPY {package}/"
        assert package in imported, f"docker/Dockerfile's import check does not import {package}"


@pytest.mark.slow
def test_built_wheel_ships_every_module_and_weight(tmp_path):
    """A non-editable install (the image's, a user's `pip install .`) gets every module and every
    shipped weight file: built from a clean copy of the tree, then its file list compared with the tree's."""
    import shutil
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "src"
    shutil.copytree(JOBS.parent, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", "tests", "bench"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             str(source), "-w", str(tmp_path / "wheel")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(p.relative_to(source)) for package in _distribution_packages()
                for p in (source / package).rglob("*") if p.is_file() and p.suffix in PACKAGE_DATA}
    assert expected - shipped == set()
    assert any(name.endswith("teacher/unet/diffusion_pytorch_model.safetensors") for name in shipped)
