"""Every documented command works as pasted.

Each shell block in README.md, jobs/README.md, bench/README.md and docs/*.md, and every example in
every `--help`, runs here as written, with only the substitutions in SUBSTITUTIONS below (bucket URLs
to the moto bucket, paper-scale counts to tiny ones, hub ids to tiny offline teachers, the cluster to a
local Ray). A block that cannot run here carries `<!-- doc-test: skip: REASON -->` on the line above
it in the document itself, and the test reports the reason. A block found nowhere in COVERED (and not
skipped) fails `test_every_block_is_covered`, so new documentation cannot slip past the suite.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = ["README.md", "jobs/README.md", "bench/README.md",
             *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
SKIP_MARK = re.compile(r"<!--\s*doc-test:\s*skip:\s*(.+?)\s*-->")
BIN = Path(sys.executable).parent

# The only edits made to documented commands, applied in this order. {bucket}: a fresh moto bucket;
# {sd15}: a tiny SD1.5-architecture teacher folder; {package}: the installed d2g package folder.
SUBSTITUTIONS: list[tuple[str, str]] = [
    # The cluster: the suite's local Ray, whose job server runs what `ray job submit` sends. Its token
    # (token auth is Ray's default) is in ~/.ray/auth_token, where Ray's clients look for it.
    (r"http://HEAD_NODE:8265", "{job_address}"),
    (r"s3://(YOUR-BUCKET|bucket)", "{bucket}"),
    (r"stable-diffusion-v1-5/stable-diffusion-v1-5", "{sd15}"),
    (r"--num-pairs 3000000\b", "--num-pairs 16"),
    (r"--num-pairs 4000000\b", "--num-pairs 32"),
    (r"--num-pairs 10000\b", "--num-pairs 8"),
    (r"--num-pairs 256\b", "--num-pairs 8"),
    (r"--steps 25\b", "--steps 2"),
    (r"--shard-size 1024\b", "--shard-size 8"),
    (r"--steps 50\b", "--steps 2"),
    (r"--dtype fp16", "--dtype fp32"),
    (r"--workers 64\b", "--workers 1"),
    (r"--commit-every 64\b", "--commit-every 1"),
    (r"--max-steps 400\b", "--max-steps 2"),
    (r"--steps 6000\b", "--steps 2"),
    (r"--steps 1500\b", "--steps 2"),
    (r"--steps 1000\b", "--steps 2"),
    (r"--n 16384\b", "--n 64"),
    (r"--latent-items 32768\b", "--latent-items 256"),
    (r"--n 4096\b", "--n 32"),
    (r"--n 512\b", "--n 16"),
    (r"--n 500\b", "--n 8"),
    (r"--out d2g/shapes/weights", "--out ./shapes-weights"),
    (r"(?<![\w/.])d2g/shapes/weights/teacher", "{package}/shapes/weights/teacher"),
    (r"(?<![\w/.])python bench/", "python {root}/bench/"),  # the scripts live in the checkout
    # jobs/*.yaml, copied into the commands' working folder with these same rules applied:
    (r"stabilityai/stable-diffusion-xl-base-1.0", "{sdxl}"),
    (r"num_pairs: \d+", "num_pairs: 16"),
    (r"shard_size: \d+", "shard_size: 8"),
    (r"(?m)^steps: 50", "steps: 2"),
    (r"dtype: fp16", "dtype: fp32"),
    (r"(?m)^(height|width): \d+.*$", ""),
    (r"batch_size: \d+", "batch_size: 4"),
    (r"workers: 64", "workers: 1"),
    (r"gpus_per_worker: 1", "gpus_per_worker: 0"),
    (r"cpus_per_worker: \d+", "cpus_per_worker: 0.5"),
    (r"use_gpu: true", "use_gpu: false"),
    (r"data_workers: \d+", "data_workers: 0"),
    (r"amp: bf16", "amp: none"),
    (r"max_steps: \d+", "max_steps: 2"),
    (r"commit_every: 64", "commit_every: 1"),
    (r"/mnt/weights/sd15_latest_vgg16_tuned.pth", "{lpips}"),
    (r"make demo(?! DEMO_ARGS)", "make -C {root} demo DEMO_ARGS='--out {cwd}/demo-out --num-pairs 32 "
     "--eval-pairs 16 --shard-size 16 --teacher-steps 2 --train-steps 2 --train-batch 4 --workers 1 "
     "--batch-size 16 --quality-prompts 8'"),
]


@dataclass(frozen=True)
class Block:
    """One documented command block: where it is, its text, and why it is not run (if it is not)."""

    source: str
    line: int
    text: str
    skip: str | None = None

    @property
    def id(self) -> str:
        return f"{self.source}:{self.line}"


def doc_blocks(relative: str) -> list[Block]:
    """The shell blocks of one Markdown file, with their skip marks."""
    lines = (ROOT / relative).read_text().splitlines()
    blocks, inside, language, start, body = [], False, "", 0, []
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            if not inside:
                inside, language, start, body = True, line[3:].strip(), number, []
            else:
                inside = False
                if language in SHELL_LANGUAGES:
                    above = lines[start - 2] if start >= 2 else ""
                    mark = SKIP_MARK.search(above)
                    blocks.append(Block(relative, start, "\n".join(body), mark.group(1) if mark else None))
        elif inside:
            body.append(line)
    return blocks


def _parsers(parser: argparse.ArgumentParser, name: str):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def help_blocks() -> list[Block]:
    """The `examples:` section of every CLI's and subcommand's --help, one block per help page."""
    import distill.cli
    import pairgen.cli
    import store.cli

    blocks = []
    for name, build in (("pairgen", pairgen.cli.build_parser), ("distill", distill.cli.build_parser),
                        ("store", store.cli.build_parser)):
        for full_name, parser in _parsers(build(), name):
            text = parser.format_help()
            if "examples:" not in text:
                continue
            examples = text.split("examples:", 1)[1]
            lines = [ln.strip() for ln in examples.splitlines() if ln.strip()]
            blocks.append(Block(f"{full_name} --help", 0, "\n".join(lines)))
    return blocks


def all_blocks() -> list[Block]:
    return [b for f in DOC_FILES for b in doc_blocks(f)] + help_blocks()


def substitute(text: str, values: dict[str, str]) -> str:
    for pattern, replacement in SUBSTITUTIONS:
        text = re.sub(pattern, replacement.format(**values), text)
    return text


def test_every_block_is_covered():
    """Blocks are found (so the parser works), and each is either run below or marked skipped."""
    blocks = all_blocks()
    assert len([b for b in blocks if b.source == "README.md"]) >= 5
    assert any(b.source.endswith("--help") for b in blocks)
    run_ids = {b.id for b in blocks if not b.skip}
    groups = [{b.id for b in group} for group in (README_BLOCKS, JOBS_BLOCKS, OTHER_BLOCKS)]
    assert set().union(*groups) == run_ids and sum(map(len, groups)) == len(run_ids), "each block in one group"


RUNNABLE = [b for b in all_blocks() if not b.skip]
SKIPPED = [b for b in all_blocks() if b.skip]
# The README with the --help examples (they use what its commands made) run here; jobs/README.md in
# test_docs_jobs.py and every other document in test_docs_more.py, so the suite's workers can take
# the three groups in parallel (a test file stays on one worker, in order).
JOBS_SOURCES = ("jobs/README.md",)
README_BLOCKS = [b for b in RUNNABLE if b.source == "README.md" or b.source.endswith("--help")]
JOBS_BLOCKS = [b for b in RUNNABLE if b.source in JOBS_SOURCES]
OTHER_BLOCKS = [b for b in RUNNABLE if b not in README_BLOCKS and b not in JOBS_BLOCKS]
# Documents that submit Ray jobs get the job server (a second Ray): jobs/README.md, and any other
# document with a `ray job` command (the README's cluster section).
JOB_SERVER_SOURCES = set(JOBS_SOURCES) | {b.source for b in RUNNABLE if "ray job" in b.text}


def _shipped_weights() -> dict[str, bytes]:
    import hashlib

    folders = [ROOT / "d2g" / "shapes" / "weights", ROOT / "distill" / "lpips" / "weights"]
    return {str(f): hashlib.sha256(f.read_bytes()).digest() for d in folders for f in sorted(d.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module", autouse=True)
def _shipped_weights_untouched():
    """No documented command, pasted as written, may replace the weights the package ships."""
    before = _shipped_weights()
    yield
    changed = sorted(k for k, v in _shipped_weights().items() if before.get(k) != v)
    assert not changed, f"documented commands changed shipped weights: {changed}"


PROMPT_FILES = ("coco.txt", "prompts/coco2014_train_captions.txt", "prompts/coco2017_train_captions.txt")


@pytest.fixture(scope="module")
def doc_envs(request, tmp_path_factory, ray_local, sd15_teacher, sdxl_teacher):
    """One environment per document, made on first use: each document is read on its own, in order.
    `--help` examples are read with the README (they use what its commands made). Every command
    joins the suite's local Ray (the "cluster"), instead of starting a Ray of its own; jobs/README.md
    is read as its user would, with RAY_ADDRESS exported as its first block says: the job server."""
    envs: dict[str, tuple] = {}
    address = ray_local.get_runtime_context().gcs_address

    def get(source: str) -> tuple:
        source = "README.md" if source.endswith("--help") else source
        if source not in envs:
            # The job server (a second Ray) only for the document that submits jobs.
            job_address = request.getfixturevalue("ray_job_address") if source in JOB_SERVER_SOURCES else ""
            cwd, env, values = _doc_env(tmp_path_factory, sd15_teacher, sdxl_teacher, address, job_address)
            if source in JOBS_SOURCES:
                env.update(RAY_ADDRESS=job_address, RAY_AUTH_MODE="token")
            envs[source] = cwd, env, values
        return envs[source]

    return get


def _doc_env(tmp_path_factory, sd15_teacher, sdxl_teacher, ray_address: str, job_address: str):
    """What a document assumes exists: the user's bucket with their caption files, the calibrated
    LatentLPIPS file a job config names, the jobs/ folder; our CLIs on PATH, no GPU, no hub."""
    import uuid

    import s3fs

    import d2g
    from distill.lpips.checkpoints import save_lpips
    from distill.lpips.latent_lpips import LatentLPIPS

    cwd = tmp_path_factory.mktemp("docs")
    bucket = f"s3://docs-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(bucket)
    for name in PROMPT_FILES:
        fs.pipe(f"{bucket}/{name}", b"a red circle\na blue square\na green triangle\n")
    lpips = cwd / "weights" / "sd15_latest_vgg16_tuned.safetensors"
    lpips.parent.mkdir()
    save_lpips(LatentLPIPS(latent_channels=4, width=0.125), lpips)
    values = {"bucket": bucket, "sd15": str(sd15_teacher), "sdxl": str(sdxl_teacher),
              "package": str(Path(d2g.__file__).parent), "root": str(ROOT), "cwd": str(cwd), "lpips": str(lpips),
              "ray_address": ray_address, "job_address": job_address}
    (cwd / "jobs").mkdir()
    for job in (ROOT / "jobs").glob("*.yaml"):
        (cwd / "jobs" / job.name).write_text(substitute(job.read_text(), values))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "RAY_ADDRESS": ray_address}
    return cwd, env, values


@pytest.mark.parametrize("block", SKIPPED, ids=[b.id for b in SKIPPED])
def test_skipped_blocks_say_why(block):
    pytest.skip(f"{block.id}: {block.skip}")


def run_block(block: Block, doc_envs) -> None:
    """Run one documented block in its document's environment; it must exit 0 without a traceback."""
    cwd, env, values = doc_envs(block.source)
    script = substitute(block.text, values)
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (
        f"{block.id} failed (exit {result.returncode}):\n$ {script}\n--- stdout\n{result.stdout[-3000:]}"
        f"\n--- stderr\n{result.stderr[-3000:]}")
    assert "Traceback" not in result.stderr, f"{block.id} printed a traceback:\n{result.stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("block", README_BLOCKS, ids=[b.id for b in README_BLOCKS])
def test_documented_block_runs_as_written(block, doc_envs):
    run_block(block, doc_envs)


def test_substitutions_only_touch_what_they_name():
    """The table cannot rewrite a command into another one: each rule's result keeps the flag it matched."""
    values = {"bucket": "s3://moto", "sd15": "/t/sd15", "sdxl": "/t/sdxl", "package": "/p", "root": "/r",
              "cwd": "/c", "lpips": "/w.safetensors", "ray_address": "127.0.0.1:1", "job_address": "http://127.0.0.1:2"}
    assert substitute("pairgen run --num-pairs 3000000 --out s3://bucket/x", values) == \
        "pairgen run --num-pairs 16 --out s3://moto/x"
    assert substitute("distill train --max-steps 4000", values) == "distill train --max-steps 4000"
    assert shlex.split(substitute("make demo", values))[:3] == ["make", "-C", "/r"]
