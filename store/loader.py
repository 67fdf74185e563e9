"""PairLoader: a DataLoader that keeps the PairDataset's resume state in the main process.

The workers iterate PairDataset.iter_tagged(), so every sample travels with its position; the
collate function splits that bookkeeping off into a _BatchRecord beside the user's batch, and the
main process records each batch in the dataset as it hands the batch to the caller.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data._utils.collate import default_collate, default_convert

from .dataset import PairDataset, SkippedRun, TaggedSample
from .errors import StoreError


@dataclass(frozen=True)
class _BatchRecord:
    """What one batch delivers, for PairDataset.record_delivered."""

    positions: tuple[int, ...]
    worker: int | None  # the worker of the batch's last sample
    skipped: tuple[SkippedRun, ...]


class _Collate:
    """Collates the samples of TaggedSamples with the user's function, and returns the batch with
    its _BatchRecord. Runs in the workers, so the record crosses to the main process with the batch."""

    def __init__(self, inner=None, batched: bool = True):
        self.batched = batched
        self.inner = inner or (default_collate if batched else default_convert)

    def __call__(self, items) -> tuple[object, _BatchRecord]:
        tagged: list[TaggedSample] = list(items) if self.batched else [items]
        record = _BatchRecord(
            positions=tuple(t.position for t in tagged),
            worker=tagged[-1].worker if tagged else None,
            skipped=tuple(run for t in tagged for run in t.skipped),
        )
        samples = [t.sample for t in tagged]
        return self.inner(samples if self.batched else samples[0]), record


class _TaggedView(IterableDataset):
    """The dataset PairLoader hands to DataLoader: the PairDataset's tagged samples. Other
    attributes are read through to the PairDataset, so `loader.dataset.state_dict()` still works."""

    def __init__(self, ds: PairDataset):
        self.ds = ds

    def __iter__(self) -> Iterator[TaggedSample]:
        return self.ds.iter_tagged()

    def __len__(self) -> int:
        return len(self.ds)

    def __getattr__(self, name: str):
        # Only called for names not found normally; never for `ds` itself or dunders, which keeps
        # unpickling (which looks up __setstate__ before `ds` exists) from recursing.
        if name == "ds" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.ds, name)


class PairLoader(DataLoader):
    """DataLoader over a PairDataset. Each batch is what the collate function returns (by default
    a dict of stacked tensors, lists of prompts/keys); consumed positions are recorded in the
    dataset, so `dataset.state_dict()` taken between batches resumes exactly after them."""

    def __init__(self, dataset: PairDataset, batch_size: int | None = 1, num_workers: int = 0, collate_fn=None, **kwargs):
        """Wrap `dataset`; nothing is read until iteration.

        Args:
            dataset: the PairDataset to load; it stays the owner of the resume state (also
                available as `pair_dataset`; `dataset` is a view of it that yields tagged samples).
            batch_size: samples per batch; None yields single samples (collated with
                default_convert unless collate_fn is given).
            num_workers: DataLoader worker processes; 0 reads in this process.
            collate_fn: turns a list of sample dicts into a batch (default: torch's default_collate).
            **kwargs: other DataLoader arguments (pin_memory, drop_last, multiprocessing_context,
                ...). sampler, batch_sampler, shuffle and persistent_workers are refused: the
                dataset shuffles and splits, and workers must get the resume state every epoch.
        """
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
        self.pair_dataset = dataset
        super().__init__(_TaggedView(dataset), batch_size=batch_size, num_workers=num_workers,
                         collate_fn=_Collate(collate_fn, batched=batch_size is not None), **kwargs)

    def __iter__(self):
        """Batches of the rest of the dataset's epoch; a complete pass moves it to the next epoch."""
        ds = self.pair_dataset
        workers = max(1, self.num_workers)
        ds.plan_workers(workers)
        epoch = ds.epoch
        for batch, record in super().__iter__():
            ds.record_delivered(record.positions, record.worker, workers, record.skipped)
            yield batch
        ds.finish_pass(epoch)
