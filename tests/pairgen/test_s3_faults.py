"""`pairgen run` writing to S3 through a proxy that throttles, fails, resets and delays 10% of the
requests (tests/helpers/s3_faults.py): the dataset equals a fault-free run's byte for byte, and
the summary counts the retried requests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pairgen.config import load_config
from pairgen.plan import ShardTask, plan_shards
from pairgen.prompts import load_prompts
from pairgen.worker import ShardGenerator
from store import PairStore
from store.cli import main as store_main
from tests.helpers.s3_faults import retry_bounds

RATE = 0.10
PROMPTS = "a red circle\na blue square\na green cat\na red square\n"
# Small shards: more requests (about 8 per shard), so 10% of them make a fair number of faults.
SETTINGS = dict(num_pairs=16, shard_size=2, steps=2, guidance=2.0, batch_size=2, seed=3)


def _reference(teacher: Path, prompts: str, out: str) -> dict[str, tuple]:
    """The shards of a fault-free run, generated in this process by the code the actors run
    (the same single torch thread), on local disk: what the faulty run must reproduce."""
    config = load_config(None, dict(teacher=str(teacher), prompts=prompts, out=out, **SETTINGS))
    source = load_prompts(prompts)
    generator = ShardGenerator(config, threads=1)
    infos = []
    for shard, name, start, stop in plan_shards(config.num_pairs, config.shard_size):
        result = generator.generate(ShardTask(shard, name, start, stop, source.prompts_for(start, stop)))
        infos.append(result["info"])
    return {i["name"]: (i["num_samples"], i["tar_xxh3"], i["index_xxh3"]) for i in infos}


def test_pairgen_run_and_verify_through_faults(s3_faults, s3_bucket, sd15_teacher, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    reference = _reference(sd15_teacher, str(prompts), str(tmp_path / "reference"))

    out = f"{s3_bucket}/pairs"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    # The CLI as a user runs it, with a local Ray of its own ("local": never one found running on
    # this machine) whose actors inherit AWS_ENDPOINT_URL, the proxy, from it, as a cluster's
    # workers inherit their environment.
    env = dict(os.environ, RAY_ADDRESS="local")
    pairgen = str(Path(sys.executable).parent / "pairgen")
    s3_faults.rate = RATE
    s3_faults.reset_counts()
    run = subprocess.run([pairgen, "run", "--teacher", str(sd15_teacher), "--prompts", str(prompts), "--out", out,
                          *flags, "--workers", "1", "--no-progress", "--json"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)
    faults = dict(s3_faults.injected)
    assert s3_faults.faults() >= 3, f"too few faults to mean anything: {faults} in {s3_faults.requests} requests"
    low, high = retry_bounds(s3_faults)
    assert low <= summary["s3_retries"] <= high, (summary["s3_retries"], faults)
    assert f"S3 requests retried {summary['s3_retries']};" in run.stderr.strip().splitlines()[-1]

    manifest = PairStore(out).manifest()
    assert {s.name: (s.num_samples, s.tar_xxh3, s.index_xxh3) for s in manifest.shards} == reference
    assert manifest.version == 1 and manifest.num_pairs == SETTINGS["num_pairs"]

    # store verify --deep reads every byte back through the same faults (in this process: cheaper
    # than another interpreter; tests/store/test_cli.py runs the console script itself).
    s3_faults.reset_counts()
    capsys.readouterr()
    assert store_main(["verify", out, "--deep", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["bad"] == [] and report["num_pairs"] == SETTINGS["num_pairs"]
    low, high = retry_bounds(s3_faults)
    assert low <= report["s3_retries"] <= high, (report["s3_retries"], dict(s3_faults.injected))
