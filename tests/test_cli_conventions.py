"""The three CLIs follow one set of conventions (store.console), and a user's mistake costs one
line naming what is wrong, exit 2, and nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _run(*argv, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=600)


def _one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("command", ["store", "pairgen", "distill"])
def test_no_subcommand_is_a_usage_error_with_help(command):
    result = _run(command)
    assert result.returncode == 2 and "usage:" in result.stderr


@pytest.mark.parametrize("argv", [["store", "info"], ["pairgen", "status"]])
def test_json_output_style_is_shared(argv, tmp_path):
    """Both print indent-2 JSON; a missing root is one line, exit 2, for both."""
    _one_line_error(_run(*argv, str(tmp_path / "missing")), str(tmp_path / "missing"))


def test_bad_teacher_is_one_line_before_ray_and_writes_nothing(tmp_path, sd15_teacher):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "pairs"
    for teacher, needle in (("/nonexistent/teacher", "does not exist"), (str(tmp_path), "no model_index.json")):
        result = _run("pairgen", "run", "--teacher", teacher, "--prompts", str(prompts), "--out", str(out))
        _one_line_error(result, teacher, needle)
        assert "Ray" not in result.stderr and not out.exists()


def test_a_root_holding_only_a_fingerprint_takes_the_corrected_settings(tmp_path):
    from store import PairStore

    root = str(tmp_path / "pairs")
    PairStore(root).ensure_fingerprint({"teacher": {"name": "a-typo"}})
    PairStore(root).ensure_fingerprint({"teacher": {"name": "shapes"}})  # no shard was ever written
    assert PairStore(root).read_fingerprint() == {"teacher": {"name": "shapes"}}


def test_out_naming_a_file_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _one_line_error(_run("pairgen", "run", "--out", str(blocker / "pairs"), "--num-pairs", "4"), str(blocker))


@pytest.fixture
def read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "none", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("a read-only filesystem needs mount (root); as a normal user chmod would do")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_read_only_out_is_one_line(read_only_folder):
    _one_line_error(_run("pairgen", "run", "--out", str(read_only_folder / "pairs"), "--num-pairs", "4"),
                    "Read-only file system", str(read_only_folder))


def test_pairgen_status_json_and_relative_out(tmp_path, sd15_teacher):
    """A relative --out lands under the user's working directory (not Ray's), and status reads it."""
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    result = _run("pairgen", "run", "--teacher", str(sd15_teacher), "--prompts", "p.txt", "--out", "rel/pairs",
                  "--num-pairs", "4", "--shard-size", "4", "--steps", "2", "--batch-size", "4", "--no-progress",
                  "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["out"] == str(tmp_path / "rel" / "pairs") and summary["pairs_generated"] == 4
    assert (tmp_path / "rel" / "pairs" / "versions").is_dir()
    assert "WARNING" not in result.stderr and "Loading" not in result.stderr, result.stderr
    status = _run("pairgen", "status", "rel/pairs", "--json", cwd=tmp_path)
    assert status.returncode == 0 and status.stdout.startswith("{\n  ")
    assert json.loads(status.stdout)["committed_pairs"] == 4


def test_interrupted_pairgen_leaves_no_temp_files(tmp_path, sd15_teacher):
    """Ctrl-C mid-shard: exit 130, finished shards committed, no half-written temp file left behind."""
    import signal
    import time

    (tmp_path / "p.txt").write_text("a red circle\n")
    out = tmp_path / "pairs"
    proc = subprocess.Popen([str(BIN / "pairgen"), "run", "--teacher", str(sd15_teacher), "--prompts", "p.txt",
                             "--out", str(out), "--num-pairs", "64", "--shard-size", "16", "--steps", "20",
                             "--batch-size", "2", "--no-progress"], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not any(p.name.startswith(".") for p in (out / "shards").glob(".*")) if (out / "shards").exists() else True:
        assert proc.poll() is None and time.monotonic() < deadline, "no shard was ever being written"
        time.sleep(0.05)  # polling for a file to appear, not waiting for time to pass
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "re-run the same command" in stderr
    leftovers = [p.name for folder in ("shards", "index") for p in (out / folder).glob(".*")]
    assert leftovers == []


def test_distill_user_errors_are_one_line(tmp_path, sd15_teacher):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    missing = tmp_path / "no-pairs"
    _one_line_error(_run("distill", "train", "--data", str(missing), "--teacher", str(sd15_teacher), "--out",
                         str(tmp_path / "run"), "--no-ray"), str(missing))
    _one_line_error(_run("distill", "train", "--teacher", str(sd15_teacher), "--objective", "d2g"),
                    "regression_kwargs.weights")
    _one_line_error(_run("distill", "train", "--teacher", str(sd15_teacher), "--objective-config",
                         "{regression_loss: e_latent_lpips, regression_kwargs: {weights: /no/such.pth}}",
                         "--data", str(missing)), str(missing))
    _one_line_error(_run("distill", "export", str(tmp_path / "no-run"), "--out", str(tmp_path / "x")), "no-run")
