"""PairLoader: a DataLoader that keeps the PairDataset's resume state in the main process."""

from __future__ import annotations

from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

from .dataset import PairDataset
from .errors import StoreError

_BOOKKEEPING = ("_position", "_worker", "_skipped")


class _Collate:
    """Pulls our bookkeeping keys out of each sample before the user's collate sees them."""

    def __init__(self, inner=None):
        self.inner = inner or default_collate

    def __call__(self, samples):
        positions = [s.pop("_position") for s in samples]
        workers = [s.pop("_worker", None) for s in samples]
        skipped = []
        for s in samples:
            skipped.extend(s.pop("_skipped", ()))
        meta = {"positions": positions, "worker": workers[-1] if workers else None, "skipped": skipped}
        return self.inner(samples), meta


class PairLoader(DataLoader):
    """DataLoader over a PairDataset. Each batch is what the collate function returns (by default
    a dict of stacked tensors, lists of prompts/keys); consumed positions are recorded in the
    dataset, so `dataset.state_dict()` taken between batches resumes exactly after them."""

    def __init__(self, dataset: PairDataset, batch_size: int | None = 1, num_workers: int = 0, collate_fn=None, **kwargs):
        if not isinstance(dataset, PairDataset):
            raise StoreError(f"PairLoader needs a store.PairDataset, got {type(dataset).__name__}")
        if kwargs.get("persistent_workers"):
            raise StoreError(
                "PairLoader does not support persistent_workers=True: workers must receive the dataset's "
                "resume state at the start of every epoch"
            )
        for bad in ("sampler", "batch_sampler", "shuffle"):
            if kwargs.get(bad):
                raise StoreError(f"PairLoader: {bad}= is not supported; shuffling and splitting happen in PairDataset")
        super().__init__(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_Collate(collate_fn), **kwargs)

    def __iter__(self):
        ds: PairDataset = self.dataset
        workers = max(1, self.num_workers)
        ds._plan(workers)
        epoch = ds.epoch
        # While we drive it, the dataset leaves all bookkeeping to us (it would otherwise end the
        # epoch in-process before the last batch reached the caller when num_workers=0).
        ds._driven = True
        try:
            for batch, meta in super().__iter__():
                ds._record(meta["positions"], meta["worker"], workers, meta["skipped"])
                yield batch
        finally:
            ds._driven = False
        if ds.epoch == epoch:
            ds._account_unreported()
        ds._complete_epoch(epoch)
