"""What a pair dataset holds and what is left to generate."""

from __future__ import annotations

from store import PairStore, StoreError, layout


def dataset_status(url: str) -> dict:
    """Versions, committed and uncommitted shards, and what is left of the last run's target.
    StoreError when nothing of a dataset is at `url`."""
    st = PairStore(url)
    latest = st.latest_version()
    fingerprint = st.read_fingerprint()
    if latest is None and fingerprint is None and not st.complete_shards():
        raise StoreError(f"{url}: no pair dataset here (no fingerprint, shards or versions)")
    manifest = st.manifest(latest) if latest is not None else None
    complete = st.complete_shards()
    committed = {s.name for s in manifest.shards} if manifest else set()
    plan = (manifest.extra or {}).get("pairgen", {}) if manifest else {}
    target = plan.get("target_num_pairs")
    shard_size = plan.get("shard_size")
    target_shards = -(-target // shard_size) if target and shard_size else None
    done_indices = {layout.shard_number(name) for name in complete} - {None}
    return {
        "url": url,
        "last_version": latest,
        "committed_pairs": manifest.num_pairs if manifest else 0,
        "committed_shards": len(committed),
        "target_num_pairs": target,
        "shards_done": len(complete),
        "shards_uncommitted": len(set(complete) - committed),
        "shards_pending": max(0, target_shards - len(done_indices)) if target_shards is not None else None,
        "fingerprint": fingerprint,
    }
