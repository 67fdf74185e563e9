"""pairgen end to end on a real local Ray, writing to local disk and to the moto S3 server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pairgen.config import ConfigError, load_config
from pairgen.runner import PairgenRun, RunError
from pairgen.worker import CRASH_ENV
from store import FingerprintMismatch, PairStore

PROMPTS = "a red circle\na blue square\na green cat\n\na red square\n"


@pytest.fixture
def prompt_file(tmp_path) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS)
    return str(path)


def _config(teacher, prompts, out, **overrides):
    base = dict(teacher=str(teacher), prompts=prompts, out=out, num_pairs=10, shard_size=4, steps=3,
                guidance=2.0, batch_size=2, workers=1, seed=5)
    base.update(overrides)
    return load_config(None, base)


def _shard_hashes(url: str, version: int | None = None) -> dict[str, tuple]:
    manifest = PairStore(url).manifest(version)
    return {s.name: (s.num_samples, s.tar_xxh3, s.index_xxh3) for s in manifest.shards}


@pytest.fixture(scope="module")
def clean16(ray_local, sd15_teacher, tmp_path_factory) -> dict:
    """Shard hashes of an uninterrupted one-worker run of 16 pairs: what every other run must equal."""
    folder = tmp_path_factory.mktemp("clean")
    prompts = folder / "prompts.txt"
    prompts.write_text(PROMPTS)
    out = str(folder / "ds")
    PairgenRun(_config(sd15_teacher, str(prompts), out, num_pairs=16), progress=False).run()
    return _shard_hashes(out)


def test_two_workers_write_the_same_bytes_as_one(clean16, sd15_teacher, prompt_file, root_url):
    summary = PairgenRun(_config(sd15_teacher, prompt_file, root_url, num_pairs=16, workers=2), progress=False).run()
    assert summary.pairs_generated == 16 and summary.version == 1
    assert list(clean16) == ["shard-000000", "shard-000001", "shard-000002", "shard-000003"]
    assert _shard_hashes(root_url) == clean16


def test_rerun_skips_done_work_and_extension_adds_a_version(clean16, sd15_teacher, prompt_file, root_url):
    first = PairgenRun(_config(sd15_teacher, prompt_file, root_url), progress=False).run()
    assert sorted(_shard_hashes(root_url)) == ["shard-000000", "shard-000001", "shard-000002-p000002"]
    st = PairStore(root_url)
    assert st.get(index=9)["prompt"] == "a blue square"  # prompt 9 % 4 of the 4 non-empty prompts
    again = PairgenRun(_config(sd15_teacher, prompt_file, root_url), progress=False).run()
    assert again.shards_generated == [] and again.shards_reused == 3 and again.version == first.version
    bigger = PairgenRun(_config(sd15_teacher, prompt_file, root_url, num_pairs=16), progress=False).run()
    # The short shard 2 becomes a full shard under its own name; shard 3 is new; 0 and 1 are reused.
    assert sorted(bigger.shards_generated) == ["shard-000002", "shard-000003"]
    assert st.versions() == [1, 2]
    latest = st.manifest(2)
    assert latest.parent == 1 and latest.num_pairs == 16
    assert st.manifest(1).num_pairs == 10, "the old version is untouched"
    assert _shard_hashes(root_url) == clean16


def test_refusals_name_the_setting(ray_local, sd15_teacher, prompt_file, tmp_path):
    out = str(tmp_path / "ds")
    PairgenRun(_config(sd15_teacher, prompt_file, out, num_pairs=8), progress=False).run()
    with pytest.raises(FingerprintMismatch, match=r"solver\.guidance"):
        PairgenRun(_config(sd15_teacher, prompt_file, out, num_pairs=8, guidance=5.0), progress=False).run()
    with pytest.raises(RunError, match="smaller than version v1"):
        PairgenRun(_config(sd15_teacher, prompt_file, out, num_pairs=4), progress=False).run()
    assert PairStore(out).versions() == [1], "a refused run writes nothing"


def test_commit_every_makes_intermediate_versions(ray_local, sd15_teacher, prompt_file, tmp_path):
    out = str(tmp_path / "ds")
    PairgenRun(_config(sd15_teacher, prompt_file, out, num_pairs=12, commit_every=1), progress=False).run()
    st = PairStore(out)
    assert st.versions() == [1, 2, 3]
    assert [st.manifest(v).num_pairs for v in (1, 2, 3)] == [4, 8, 12]
    assert [st.manifest(v).parent for v in (1, 2, 3)] == [None, 1, 2]


def test_worker_killed_mid_shard_is_retried(clean16, sd15_teacher, prompt_file, tmp_path, monkeypatch):
    marker = tmp_path / "crashed"
    # The actor process exits hard after the first batch of shard 1, as a dying node would.
    monkeypatch.setenv(CRASH_ENV, f"1:1:{marker}")
    out = str(tmp_path / "faulty")
    summary = PairgenRun(_config(sd15_teacher, prompt_file, out, num_pairs=16, workers=2), progress=False).run()
    assert marker.exists(), "the fault was injected"
    assert summary.retries >= 1 and summary.actors_replaced >= 1
    assert _shard_hashes(out) == clean16


def _writing_pids(out: Path, ignore: frozenset = frozenset()) -> set[int]:
    """The PIDs of the teacher actors writing a shard of `out` now (a temp file is
    `.NAME.tmp-<pid>-<rand>`), skipping the temp files in `ignore` (left by an earlier run) and any
    PID that is not a live teacher actor's process (`ray::ShardGenerator`)."""
    pids = set()
    for tmp in out.rglob(".shard-*.tmp-*"):
        if tmp in ignore:
            continue
        pid = int(tmp.name.split(".tmp-")[1].split("-")[0])
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::ShardGenerator"):
                pids.add(pid)
        except OSError:  # that writer is gone already
            continue
    return pids


def test_driver_killed_then_rerun_equals_clean_run(clean16, ray_local, sd15_teacher, prompt_file, tmp_path):
    """The whole `pairgen run` process gets SIGKILL after its second shard; the same command,
    re-run, finishes the dataset without regenerating any finished shard, though its teacher actor's
    process is killed too, and its `--json` stdout is one JSON document."""
    out = str(tmp_path / "ds")
    args = [str(Path(sys.executable).parent / "pairgen"), "run", "--teacher", str(sd15_teacher), "--prompts",
            prompt_file, "--out", out, "--num-pairs", "16", "--shard-size", "4", "--steps", "3",
            "--guidance", "2", "--batch-size", "2", "--workers", "1", "--seed", "5", "--no-progress", "--json",
            "--commit-every", "1"]
    # The CLI joins the running local Ray as a cluster driver would (RAY_ADDRESS), rather than
    # starting a Ray of its own.
    cluster = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    env = dict(cluster, D2G_FAULT_KILL_DRIVER_AFTER_SHARDS="2")
    killed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    st = PairStore(out)
    done_before = set(st.complete_shards())
    assert len(done_before) >= 2 and len(done_before) < 4
    # The re-run also loses its teacher actor's process mid-shard (SIGKILL, as the OOM killer would):
    # Ray's driver then prints `(raylet) A worker died ...`, which must not reach the --json stdout.
    stale = frozenset(Path(out).rglob(".shard-*.tmp-*"))
    proc = subprocess.Popen(args, env=cluster, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (writing := _writing_pids(Path(out), stale)):
        assert proc.poll() is None and time.monotonic() < deadline, "no shard was started"
        time.sleep(0.02)  # polling for a file to appear, not waiting for time to pass
    os.kill(writing.pop(), signal.SIGKILL)  # the teacher actor this test's command started
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    summary = json.loads(stdout)  # stdout holds nothing but the JSON document ...
    # ... though Ray's driver did print its line about the dead worker (to stdout, unless redirected).
    assert "(raylet) A worker died or was killed" in stderr and "actor died" in stderr, stderr[-3000:]
    assert summary["actors_replaced"] == 1, summary
    assert not set(summary["shards_generated"]) & done_before, "no finished shard is generated twice"
    assert _shard_hashes(out) == clean16
    status = subprocess.run([args[0], "status", out, "--json"], capture_output=True, text=True, check=True)
    status = json.loads(status.stdout)
    assert status["shards_pending"] == 0 and status["committed_pairs"] == 16 and status["shards_uncommitted"] == 0


def test_sdxl_teacher_with_embeddings_and_trajectory(ray_local, sdxl_teacher, prompt_file, root_url):
    config = _config(sdxl_teacher, prompt_file, root_url, num_pairs=4, store_prompt_embeds=True,
                     trajectory_points=1, scheduler="euler")
    PairgenRun(config, progress=False).run()
    sample = PairStore(root_url).get(index=3)
    assert set(sample) >= {"noise", "latent", "prompt_embeds", "pooled_prompt_embeds", "trajectory"}
    assert tuple(sample["trajectory"].shape) == (1, 4, 8, 8)


def test_config_errors_name_the_field(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("teacher: shapes\nnum_pairs: -3\n")
    with pytest.raises(ConfigError, match="num_pairs"):
        load_config(str(bad))
    bad.write_text("teacher: shapes\nnum_pears: 3\n")
    with pytest.raises(ConfigError, match="num_pears"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="scheduler"):
        load_config(None, {"scheduler": "heun"})
    good = tmp_path / "g.yaml"
    good.write_text("steps: 7\nguidance: 4\n")
    config = load_config(str(good), {"guidance": 2.5})
    assert config.steps == 7 and config.guidance == 2.5, "flags override the file"


def test_cli_errors_before_work_and_status(sd15_teacher, prompt_file, tmp_path):
    exe = str(Path(sys.executable).parent / "pairgen")
    out = subprocess.run([exe, "run", "--scheduler", "heun"], capture_output=True, text=True)
    assert out.returncode == 2 and "heun" in out.stderr
    missing = subprocess.run([exe, "run", "--prompts", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "x")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "nope.txt" in missing.stderr and "does not exist" in missing.stderr
    assert not (tmp_path / "x").exists(), "nothing is written before validation passes"
