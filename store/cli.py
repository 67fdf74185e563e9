"""`store` command line: versions, info, verify, head. Conventions (exit codes, --json, -v/-q): store.console."""

from __future__ import annotations

import argparse
import json
import sys

from . import console
from .errors import StoreError
from .pairstore import PairStore
from .s3_retries import is_s3, retried_requests
from .schema import INDEX, KEY, PROMPT, SEED, SHARD
from .url import parse_url


def _open(url: str) -> tuple[PairStore, int | None]:
    root, version = parse_url(url)
    return PairStore(root), version


def cmd_versions(args) -> int:
    """`store versions URL`: one line (or JSON object) per committed version."""
    st, _ = _open(args.url)
    rows = []
    for v in st.versions():
        m = st.manifest(v)
        rows.append({"version": v, "parent": m.parent, "created": m.created, "num_pairs": m.num_pairs,
                     "num_shards": m.num_shards, "bytes": m.bytes})
    if not rows and not st.fs.exists(st.root):
        raise StoreError(f"{st.url}: no such dataset root")
    if args.json:
        console.print_json(rows)
    else:
        for r in rows:
            parent = "-" if r["parent"] is None else f"v{r['parent']}"
            print(f"v{r['version']}\t{r['created']}\tparent={parent}\tpairs={r['num_pairs']}\tshards={r['num_shards']}\tbytes={r['bytes']}")
        if not rows:
            print(f"{st.url}: no committed versions")
    return 0


def cmd_info(args) -> int:
    """`store info URL[@vN]`: the summary of one version (the latest by default)."""
    st, version = _open(args.url)
    m = st.manifest(version)
    info = {
        "url": f"{st.url}@v{m.version}",
        "version": m.version,
        "parent": m.parent,
        "created": m.created,
        "toolkit_version": m.toolkit_version,
        "num_pairs": m.num_pairs,
        "num_shards": m.num_shards,
        "bytes": m.bytes,
        "fingerprint": m.fingerprint,
        "schema": m.schema.to_dict(),
        "extra": m.extra,
    }
    if args.json:
        console.print_json(info)
    else:
        for k, v in info.items():
            print(f"{k}: {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    return 0


def cmd_verify(args) -> int:
    """`store verify URL[@vN]`: check every shard of a version; exit status 1 if any is bad. The
    summary counts the S3 requests that were retried (store.s3_retries)."""
    from tqdm import tqdm

    from .verify import verify_version

    retried_before = retried_requests()
    st, version = _open(args.url)
    m = st.manifest(version)
    total = sum(s.tar_bytes for s in m.shards)
    with tqdm(total=total, unit="B", unit_scale=True, file=sys.stderr, disable=None, desc="verify") as bar:
        problems = verify_version(st, m, deep=args.deep, jobs=args.jobs, progress=bar.update)
    s3_retries = retried_requests() - retried_before  # everything this command sent, the manifest too
    if args.json:
        console.print_json({"url": f"{st.url}@v{m.version}", "version": m.version, "deep": args.deep,
                          "ok": not problems, "num_shards": m.num_shards, "num_pairs": m.num_pairs,
                          "s3_retries": s3_retries,
                          "bad": [{"shard": p.shard, "reason": p.reason} for p in problems]})
    else:
        for p in problems:
            print(f"BAD {p.shard}: {p.reason}")
        status = "OK" if not problems else f"FAILED: {len(problems)} bad shard(s)"
        # Said for S3 roots only (elsewhere it is always 0), before the status, which ends the line.
        retried = f", {s3_retries} S3 requests retried" if is_s3(st.fs) else ""
        print(f"{st.url}@v{m.version}: {m.num_shards} shards, {m.num_pairs} pairs checked"
              f"{' (deep)' if args.deep else ''}{retried}: {status}")
        if problems:
            print("A pairgen dataset is repaired by re-running the pairgen command that made it with --repair: "
                  "it regenerates exactly these shards, byte-identical, and commits a new version.", file=sys.stderr)
    return 1 if problems else 0


def cmd_head(args) -> int:
    """`store head URL[@vN]`: the first samples of a version, from the indexes only."""
    st, version = _open(args.url)
    m = st.manifest(version)
    rows = []
    for s in m.shards:
        if len(rows) >= args.n:
            break
        sidx = st.shard_index(s.name)
        for r in range(min(len(sidx), args.n - len(rows))):
            rows.append({INDEX: int(sidx.indices[r]), KEY: sidx.keys[r], SEED: int(sidx.seeds[r]),
                         PROMPT: sidx.prompts[r], SHARD: s.name})
    if args.json:
        console.print_json(rows)
    else:
        for r in rows:
            print(f"{r[INDEX]}\t{r[KEY]}\t{r[SHARD]}\tseed={r[SEED]}\t{r[PROMPT]}")
    return 0


EXAMPLES = """examples:
  store versions ./demo-out/pairs
  store info ./demo-out/pairs@v1 --json
  store verify ./demo-out/pairs --deep
  store head ./demo-out/pairs -n 3
"""


def build_parser() -> argparse.ArgumentParser:
    """The `store` argument parser (one subcommand per inspection)."""
    p = argparse.ArgumentParser(prog="store", description="Inspect and verify d2g pair datasets (URL or URL@vN).",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    for name, fn, helptext in (
        ("versions", cmd_versions, "list committed versions"),
        ("info", cmd_info, "summary of a version (latest by default)"),
        ("verify", cmd_verify, "check every shard of a version; exit 1 if anything is wrong"),
        ("head", cmd_head, "first samples of a version"),
    ):
        sp = sub.add_parser(name, help=helptext, description=helptext)
        sp.add_argument("url", help="dataset root (path, file://, s3://, ...), optionally @vN")
        console.add_json_flag(sp)
        sp.set_defaults(func=fn)
        if name == "verify":
            sp.add_argument("--deep", action="store_true", help="also decode every array and check per-sample hashes")
            sp.add_argument("--jobs", type=int, default=4, help="shards checked in parallel (default 4)")
        if name == "head":
            sp.add_argument("-n", type=int, default=5, help="number of samples (default 5)")
    console.add_verbosity_flags(p)  # after the subcommands, so each gets them too
    return p


def main(argv: list[str] | None = None) -> int:
    """Run `store`; see store.console for exit codes. Any failure is one line (a traceback with -v)."""
    return console.run_command(build_parser(), argv, (Exception,))


if __name__ == "__main__":
    sys.exit(main())
