"""Shared fixtures: a real S3 API (moto server on loopback), a real local Ray, tiny offline teachers.

Storage tests take the `root_url` fixture, parametrised over local disk and S3, so every storage
path is exercised on both.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

# Never reach a model hub. One torch thread per process: the suite runs Ray actors and
# subprocesses beside the test process on 2 cores, and oversubscribed threads slow every step ~10x.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Fake credentials: moto accepts anything, and no test may touch a real account.
for key, value in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}.items():
    os.environ[key] = value
os.environ.pop("AWS_PROFILE", None)

# The longest test files (seconds per file measured in CI runs, longest first). pytest-xdist hands
# out files in collection order and, alphabetically, the documentation files came last: the run
# ended with one worker reading the README's commands while the other idled. Longest first, the
# many short files fill in at the end.
LONGEST_FILES = (
    "tests/test_docs.py",
    "tests/distill/test_objectives_shapes.py",
    "tests/distill/test_ray_failures.py",
    "tests/test_docs_jobs.py",
    "tests/distill/test_trainer.py",
    "tests/pairgen/test_run.py",
    "tests/test_cli_conventions.py",
    "tests/test_docs_more.py",
)


def pytest_collection_modifyitems(session, config, items):
    """Longest files first (see LONGEST_FILES); within a file, and among the rest, the usual order.
    Deterministic, so every xdist worker collects the same order."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    position = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (rank.get(item.nodeid.split("::")[0], len(rank)), position[id(item)]))


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """A moto S3 server on 127.0.0.1. Exported as AWS_ENDPOINT_URL, the way users point every
    S3 client at MinIO, so our code and CLIs are tested reaching it with no extra flag."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    os.environ.pop("AWS_ENDPOINT_URL", None)
    server.stop()


@pytest.fixture
def s3_faults(s3_endpoint, monkeypatch):
    """A fault-injecting proxy in front of the moto server (tests/helpers/s3_faults.py), exported
    as AWS_ENDPOINT_URL for this test, so our code and CLIs (and their subprocesses) reach moto
    through it with no extra flag. It forwards everything until the test sets its `rate`."""
    import s3fs

    from tests.helpers.s3_faults import FaultyS3Proxy

    proxy = FaultyS3Proxy(s3_endpoint).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    # s3fs caches filesystems by their arguments, not by the environment: a cached one would
    # still talk to moto directly, and after the test one bound to the proxy would outlive it.
    s3fs.S3FileSystem.clear_instance_cache()
    yield proxy
    s3fs.S3FileSystem.clear_instance_cache()
    proxy.stop()


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh bucket per test; returns its s3:// URL."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True)
    fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture(params=["local", "s3"])
def root_url(request, tmp_path) -> str:
    """A dataset root URL, once on local disk and once on the moto S3 server."""
    if request.param == "local":
        return str(tmp_path / "pairs")
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket}/pairs"


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """A real local Ray with 2 CPUs. Started after the S3 endpoint is exported, so its
    workers inherit AWS_ENDPOINT_URL like a cluster's workers inherit their environment."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()


def _start_ray_head(bin_dir: Path, env: dict, temp_dir: Path):
    """(process, job server address, GCS port) of `ray start --head --block` with every port free,
    once its dashboard answers; None if it exited first (another process took one of the ports
    between our choosing it and Ray binding it: pytest-xdist workers start Rays side by side).
    Its output goes to temp_dir/head.log."""
    import subprocess
    import time
    import urllib.request

    dashboard = _free_port()
    ports = {"--port": _free_port(), "--dashboard-port": dashboard, "--dashboard-agent-listen-port": _free_port(),
             "--dashboard-agent-grpc-port": _free_port(), "--ray-client-server-port": _free_port(),
             "--runtime-env-agent-port": _free_port(), "--metrics-export-port": _free_port(),
             "--node-manager-port": _free_port(), "--object-manager-port": _free_port()}
    with open(temp_dir / "head.log", "ab") as log:
        head = subprocess.Popen(
            [str(bin_dir / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--include-dashboard", "true",
             "--dashboard-host", "127.0.0.1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
             "--temp-dir", str(temp_dir), *[str(x) for kv in ports.items() for x in kv]],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while True:  # the dashboard answers (401 without a token) once the head is up
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                return head, address, ports["--port"]
        except urllib.error.HTTPError:
            return head, address, ports["--port"]
        except OSError:
            if head.poll() is not None:
                _stop_process_group(head)
                return None
            assert time.monotonic() < deadline, f"the job server did not come up in 120 s; see {temp_dir}/head.log"
            time.sleep(0.5)  # polling a server that is starting, not waiting for time to pass


def _stop_process_group(process) -> None:
    """SIGTERM to the process's group, SIGKILL after 5 s (a clean stop of every Ray daemon took over
    30 s here; the folder and ports are the test's own)."""
    import signal
    import subprocess

    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=5)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="session")
def ray_job_address(s3_endpoint, tmp_path_factory):
    """A second local Ray, with a job server, as a cluster's head node runs it: `ray start --head`
    with our CLIs on its PATH and the S3 endpoint in its environment, which submitted jobs inherit
    (as a cluster's nodes get both from their image). Yields the job server's http:// address.

    Every port is chosen free: a second Ray's fixed defaults (the dashboard agent's 52365, the
    client server's 10001) would collide with any other Ray on this machine. Stopped by killing
    its own process group, never `ray stop` (which ends every Ray on the machine)."""
    import sys

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    import shutil
    import tempfile

    # Not under pytest's temp folder: Ray's socket paths below it would pass the 107-byte AF_UNIX
    # limit in an xdist worker's longer folder (/tmp/pytest-of-USER/pytest-N/popen-gwK/...).
    temp_dir = Path(tempfile.mkdtemp(prefix="d2g-head-"))
    for _ in range(3):
        started = _start_ray_head(bin_dir, env, temp_dir)
        if started:
            break
    else:
        raise AssertionError(f"ray start --head exited three times; its output:\n{(temp_dir / 'head.log').read_text()[-3000:]}")
    head, address, gcs_port = started
    try:
        yield address
    finally:
        _stop_process_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
    from tests.helpers.ray_cluster import forget_cluster

    forget_cluster(f"127.0.0.1:{gcs_port}")


@pytest.fixture(scope="session")
def sd15_teacher(tmp_path_factory) -> Path:
    from d2g.testing import build_sd15

    return build_sd15(tmp_path_factory.mktemp("teachers") / "sd15")


@pytest.fixture(scope="session")
def sdxl_teacher(tmp_path_factory) -> Path:
    from d2g.testing import build_sdxl

    return build_sdxl(tmp_path_factory.mktemp("teachers") / "sdxl")


@pytest.fixture(scope="session")
def sd3_teacher(tmp_path_factory) -> Path:
    from d2g.testing import build_sd3

    return build_sd3(tmp_path_factory.mktemp("teachers") / "sd3")


@pytest.fixture(scope="session")
def flux_teacher(tmp_path_factory) -> Path:
    from d2g.testing import build_flux

    return build_flux(tmp_path_factory.mktemp("teachers") / "flux")
