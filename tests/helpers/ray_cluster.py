"""A simulated multi-node Ray cluster for node-loss tests: a head with no CPUs (the driver's node,
as on a real cluster) and worker nodes that a test can remove mid-run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CLUSTER_POINTER = Path("/tmp/ray/ray_current_cluster")


def forget_cluster(address: str) -> None:
    """Remove Ray's record of the last cluster started on this machine if it is `address`: a later
    plain ray.init() would otherwise try to join it (gone by then) instead of starting its own."""
    port = address.split(":")[-1]
    if CLUSTER_POINTER.exists() and port in CLUSTER_POINTER.read_text():
        CLUSTER_POINTER.unlink()


@contextmanager
def simulated_cluster(worker_nodes: int = 2, cpus_per_node: float = 1) -> Iterator[tuple]:
    """(cluster, worker node handles) of a running `ray.cluster_utils.Cluster`; shut down and
    forgotten on exit. Join it with RAY_ADDRESS=cluster.address; remove a node with
    cluster.remove_node(handle)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    address = cluster.address  # shutdown() clears it
    try:
        nodes = [cluster.add_node(num_cpus=cpus_per_node) for _ in range(worker_nodes)]
        cluster.wait_for_nodes()
        yield cluster, nodes
    finally:
        cluster.shutdown()
        forget_cluster(address)


_ACTORS = """
import json, ray
from ray._private import state
ray.init(address="auto", logging_level="ERROR")
print(json.dumps([{"class": a["ActorClassName"], "node": a["Address"]["NodeID"], "pid": a["Pid"], "state": a["State"]}
                  for a in state.actors().values()]))
"""


def cluster_actors(address: str) -> list[dict]:
    """Every actor the cluster at `address` has had ({class, node, pid, state}), from its GCS
    actor table (the state API needs the dashboard, which the simulated cluster runs without). Asked
    from a fresh process: a test's own Ray session is another cluster."""
    done = subprocess.run([sys.executable, "-c", _ACTORS], env={**os.environ, "RAY_ADDRESS": address},
                          capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])
