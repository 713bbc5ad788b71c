"""Batches built in DataLoader worker processes, so rendering and encoding keep a GPU busy.

A training step of the tiny model on a GPU takes milliseconds; rendering a synthetic page and
running the processor on it takes tens of milliseconds of one CPU core. Each worker runs its own
seeded stream (``make_stream(worker_id)``) and the loader interleaves them in a fixed round-robin
order, so a run stays reproducible for a given number of workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

Batch = dict[str, torch.Tensor]


def _half(batch: Batch) -> Batch:
    return {k: v.half() if v.dtype == torch.float32 else v for k, v in batch.items()}


class _WorkerStreams(IterableDataset):
    def __init__(self, make_stream: Callable[[int], Iterator[Batch]], half_floats: bool):
        self.make_stream = make_stream
        self.half_floats = half_floats

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        stream = self.make_stream(info.id if info is not None else 0)
        return map(_half, stream) if self.half_floats else stream


def _one_thread(_: int) -> None:
    # Many workers each with a full intra-op pool would oversubscribe the cores the GPU feeder needs.
    torch.set_num_threads(1)


def parallel_batches(
    make_stream: Callable[[int], Iterator[Batch]],
    workers: int,
    prefetch: int = 2,
    pin_memory: bool = False,
    half_floats: bool = False,
) -> Iterator[Batch]:
    """``make_stream(0)`` in this process when ``workers == 0``; else ``workers`` processes, one stream each.

    ``half_floats``: workers hand float32 tensors over as float16 (:func:`to_device` restores them).
    Normalised 8-bit pixels lose nothing to float16 (its step near 2 is 0.002, a pixel level is
    about 0.015 after normalisation), and a batch of high-budget views is hundreds of MB of
    float32 in shared memory otherwise.
    """
    if workers <= 0:
        return make_stream(0)
    loader = DataLoader(
        _WorkerStreams(make_stream, half_floats),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=prefetch,
        pin_memory=pin_memory,
        worker_init_fn=_one_thread,
    )
    return iter(loader)


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    """Move a batch to ``device``; float16 tensors (from ``half_floats`` workers) come back as float32."""
    moved = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.float() if v.dtype == torch.float16 else v for k, v in moved.items()}
