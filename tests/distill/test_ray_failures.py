"""How a Ray Train run of `distill train` ends when it cannot finish (issue #21), run as a user runs
it: the CLI in a subprocess, joined to a real local Ray through RAY_ADDRESS.

- a worker that cannot see --data from its node fails fast, as one line naming the node, the path
  and the need for shared storage (exit 2), instead of Ray Train retrying it and a traceback;
- more worker-group failures than --max-failures: a notice at each restart, then one line with
  what failed, where, the latest checkpoint and the command that resumes (exit 2);
- one Ctrl-C stops the run: the workers are stopped, one line says where to resume (exit 130).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill.shared_storage import MARKER
from distill.trainer import KILL_AT_STEP_ENV
from tests.helpers.signals import sigint_as_a_terminal_gives_it
from tests.helpers.store_data import make_dataset

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """24 synthetic pairs of the tiny SD1.5 teacher's latent shape."""
    out = tmp_path_factory.mktemp("failure-pairs") / "pairs"
    make_dataset(str(out), shards=3, per_shard=8)
    return out


def _args(pairs: Path, teacher: Path, out: Path, *extra: str) -> list[str]:
    return ["distill", "train", "--data", str(pairs), "--teacher", str(teacher), "--out", str(out),
            "--objective", "regression", "--objective-config", '{"regression_loss": "mse"}', "--batch-size", "2",
            "--workers", "1", "--log-every", "1", "--threads", "1", "--no-progress", *extra]


def _start(args: list[str], ray_local, **env: str) -> subprocess.Popen:
    address = ray_local.get_runtime_context().gcs_address
    return subprocess.Popen([str(BIN / args[0]), *args[1:]], env={**os.environ, "RAY_ADDRESS": address, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_as_a_terminal_gives_it)


def _complete_steps(out: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*/COMPLETE"))


def _live_train_workers(ray_local) -> list[str]:
    # The GCS actor table (the state API needs the dashboard, which this Ray runs without).
    from ray._private import state

    return [a["ActorID"] for a in state.actors().values()
            if a["ActorClassName"].endswith("RayTrainWorker") and a["State"] != "DEAD"]


class _Holder:
    def ready(self) -> bool:
        return True


def test_a_worker_that_cannot_see_the_data_fails_fast_naming_its_node(ray_local, pairs, sd15_teacher, tmp_path):
    """The driver sees --data; the worker, started after the folder is gone from its 'node', does
    not (as on a cluster node without the mount). Ray Train would retry it --max-failures times;
    the driver stops the run at the worker's first report instead."""
    data, out = tmp_path / "pairs", tmp_path / "run"
    shutil.copytree(pairs, data)
    # Every CPU taken: Ray Train's worker waits until the driver's checks are done and the data is gone.
    holder = ray_local.remote(num_cpus=ray_local.cluster_resources()["CPU"])(_Holder).remote()
    ray_local.get(holder.ready.remote())
    proc = _start(_args(data, sd15_teacher, out, "--max-steps", "4", "--max-failures", "3"), ray_local)
    try:
        deadline = time.monotonic() + 120
        while not (out / MARKER).exists():  # written after the driver checked --data, before fit()
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)  # polling for a file to appear, not waiting for time to pass
        shutil.rmtree(data)
    finally:
        ray_local.kill(holder)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr[-3000:]  # no traceback, no restart notices
    node = ray_local.get_runtime_context().get_node_id()[:12]
    assert lines[0].startswith("distill: error: the training worker on node ") and f"(node id {node})" in lines[0]
    assert f"cannot read --data {data} (it does not exist there)" in lines[0]
    assert "shared storage (s3://..., or an NFS mount on every node)" in lines[0]
    assert not (out / MARKER).exists()  # the driver's marker is removed with the run


def test_a_teacher_that_fails_to_load_on_the_worker_stops_at_once(ray_local, pairs, sd15_teacher, tmp_path):
    """The driver checks only the teacher's model index; the worker loads its weights. A corrupt UNet
    file fails the same way on every restart, so the run stops at the first failure with one line
    naming the teacher instead of Ray Train retrying it --max-failures times."""
    teacher, out = tmp_path / "teacher", tmp_path / "run"
    shutil.copytree(sd15_teacher, teacher)
    weights = next((teacher / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:64])
    proc = _start(_args(pairs, teacher, out, "--max-steps", "4", "--max-failures", "3"), ray_local)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr[-3000:]
    ours = [line for line in stderr.splitlines() if line.startswith("distill:")]
    assert "Traceback" not in stderr and not [line for line in ours if "restarted" in line], stderr[-3000:]
    assert len(ours) == 1 and ours[0].startswith(f"distill: error: cannot load teacher '{teacher}'"), stderr[-3000:]


def test_more_failures_than_max_failures_is_one_line_with_the_resume_command(ray_local, pairs, sd15_teacher,
                                                                             tmp_path):
    """The worker's process dies after step 3 on every start (each resumes from the checkpoint at
    step 2 and reaches step 3 again): one restart (--max-failures 1), then one line instead of Ray
    Train's WorkerGroupError."""
    out = tmp_path / "run"
    args = _args(pairs, sd15_teacher, out, "--max-steps", "6", "--checkpoint-every", "2", "--max-failures", "1")
    proc = _start(args, ray_local, **{KILL_AT_STEP_ENV: "3"})
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr[-3000:]
    ours = [line for line in stderr.splitlines() if line.startswith("distill:")]
    assert "Traceback" not in stderr, stderr[-3000:]
    restarts, error = [line for line in ours if "restarted" in line], ours[-1]
    assert restarts == ["distill: Ray Train restarted the worker group on 1 worker(s) (start 2 of this run); resuming "
                        f"from step 2, the latest complete checkpoint in {out}"], stderr[-3000:]
    node = ray_local.get_runtime_context().get_node_id()[:12]
    assert error.startswith("distill: error: training worker rank 0 on node ") and f"(node id {node})" in error
    assert "its process died" in error and "gave up after 1 restart(s) (--max-failures)" in error
    assert f"the latest complete checkpoint is step 2 in {out}" in error and _complete_steps(out) == [2]
    assert error.endswith(f"resume with: {shlex.join(args)} (-v shows the traceback)")


def test_one_ctrl_c_stops_the_workers_and_says_where_to_resume(ray_local, pairs, sd15_teacher, tmp_path):
    out = tmp_path / "run"
    args = _args(pairs, sd15_teacher, out, "--max-steps", "100000", "--checkpoint-every", "2")
    proc = _start(args, ray_local)
    for line in proc.stderr:
        if line.startswith("distill: step "):
            break
    else:
        pytest.fail(f"no progress line; exit {proc.wait()}")
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    # A hang guard, not a timing: beside a busy second test worker the stop took over 60 s once.
    _, rest = proc.communicate(timeout=180)
    print(f"exit {proc.returncode} {time.monotonic() - sent:.1f} s after one SIGINT")
    assert proc.returncode == 130, rest[-3000:]
    assert "Traceback" not in rest, rest[-3000:]
    last = rest.strip().splitlines()[-1]
    found = re.fullmatch(r"distill: interrupted; the training workers are stopped; the latest complete checkpoint "
                         rf"is step (\d+) in {re.escape(str(out))}; resume with: (.*)", last)
    assert found, last
    assert int(found[1]) == _complete_steps(out)[-1] and found[2] == shlex.join(args)
    deadline = time.monotonic() + 30
    while _live_train_workers(ray_local):  # Ray marks the killed actors dead
        assert time.monotonic() < deadline, _live_train_workers(ray_local)
        time.sleep(0.1)  # polling for the actors' state, not waiting for time to pass
    assert _complete_steps(out)[-1] == int(found[1])  # nothing trained on after the stop
