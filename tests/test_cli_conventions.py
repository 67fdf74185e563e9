"""The three CLIs follow one set of conventions (store.console), and a user's mistake costs one
line naming what is wrong, exit 2, and nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.signals import sigint_as_a_terminal_gives_it

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


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, sd15_teacher) -> str:
    """A run folder with one complete checkpoint: one in-process step of MSE regression on a tiny
    store (no Ray, no pairgen: seconds), for the export cases."""
    from distill.train_config import load_train_config
    from distill.trainer import Trainer
    from tests.helpers.store_data import make_dataset

    folder = tmp_path_factory.mktemp("export-run")
    make_dataset(str(folder / "pairs"), shards=1, per_shard=4)
    Trainer(load_train_config(None, dict(
        data=str(folder / "pairs"), teacher=str(sd15_teacher), out=str(folder / "run"), objective="regression",
        objective_config={"regression_loss": "mse"}, max_steps=1, batch_size=4, shuffle_block=4, use_ray=False,
        ema_decay=0.0))).run(progress=False)
    return str(folder / "run")


def _writing_command(command: str, out: str, request) -> list[str]:
    """A command that writes to `out` and is otherwise valid enough to get to writing."""
    if command == "pairgen":
        return ["pairgen", "run", "--out", out, "--num-pairs", "4"]
    if command == "train":  # Ray mode, the default: --out must be refused before Ray starts
        return ["distill", "train", "--out", out, "--max-steps", "1"]
    return ["distill", "export", request.getfixturevalue("trained_run"), "--out", out]


# One run per command and test (each CLI start costs seconds): --out below the file or read-only
# folder, or the file or folder itself, spread so that each command meets both kinds.
@pytest.mark.parametrize("command, where", [("pairgen", "below"), ("train", "below"), ("export", "itself")])
def test_out_naming_a_file_is_one_line(command, where, tmp_path, request):
    """--out below a file, or a file itself: one line naming the path, exit 2, the file untouched."""
    blocker = tmp_path / "a-file"
    blocker.write_text("keep")
    result = _run(*_writing_command(command, str(blocker / "out") if where == "below" else str(blocker), request))
    _one_line_error(result, str(blocker))
    assert "Ray" not in result.stderr and blocker.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.fixture
def read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "none", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("a read-only filesystem needs mount (root); as a normal user chmod would do")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("command, where", [("pairgen", "below"), ("train", "itself"), ("export", "below")])
def test_read_only_out_is_one_line(command, where, read_only_folder, request):
    """--out in, or at, a read-only folder: one line saying so and naming it, exit 2."""
    out = str(read_only_folder / "out") if where == "below" else str(read_only_folder)
    result = _run(*_writing_command(command, out, request))
    _one_line_error(result, "Read-only file system", str(read_only_folder))
    assert "Ray" not in result.stderr and list(read_only_folder.iterdir()) == []


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
                             "--out", str(out), "--num-pairs", "256", "--shard-size", "16", "--steps", "20",
                             "--batch-size", "2", "--no-progress"], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_as_a_terminal_gives_it)
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


@pytest.mark.parametrize("command", ["pairgen", "distill"])
def test_job_server_address_outside_a_job_is_one_line(tmp_path, command):
    """RAY_ADDRESS still set to the job server's http:// URL (jobs/README.md exports it for `ray job
    submit`) when a command is run directly: one line saying what to do, before anything is written."""
    from tests.helpers.store_data import make_dataset

    out = tmp_path / "out"
    if command == "pairgen":
        argv = ["pairgen", "run", "--num-pairs", "4", "--shard-size", "4", "--steps", "2", "--out", str(out)]
    else:
        make_dataset(str(tmp_path / "pairs"))
        argv = ["distill", "train", "--data", str(tmp_path / "pairs"), "--teacher", "shapes", "--objective", "regression",
                "--max-steps", "1", "--out", str(out)]
    result = _run(*argv, env={"RAY_ADDRESS": "http://127.0.0.1:8265"})
    _one_line_error(result, "RAY_ADDRESS=http://127.0.0.1:8265", "ray job submit", "HEAD_NODE:6379")
    assert not out.exists()
