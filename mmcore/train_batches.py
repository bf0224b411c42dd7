"""Which pairs each rank trains on at each step, and a DataLoader whose workers decode them.

Batches come from torch's `DistributedSampler` (seeded per epoch, never the global RNG): each
rank gets every world-th pair of the epoch's permutation, so the global batch of a step is
the same pairs whatever the number of processes, and two processes train exactly as one on
the combined batch. With fewer pairs than one global batch, an epoch is one step of
`len(train) // world` pairs per rank: shards are always of equal size (all_gather needs it).
"""

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .errors import InputError
from .images import load_image


def epoch_batches(n_pairs: int, batch_size: int, epoch: int, seed: int, rank: int,
                  world: int) -> list:
    """This rank's batches (lists of pair indices) for one epoch."""
    if n_pairs < world:
        raise InputError(f"{n_pairs} training pairs cannot be shared by {world} processes.")
    sampler = DistributedSampler(range(n_pairs), num_replicas=world, rank=rank, shuffle=True,
                                 seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    mine = list(sampler)
    if len(mine) < batch_size:
        return [mine]                       # less than one global batch: one smaller step
    return [mine[k * batch_size:(k + 1) * batch_size] for k in range(len(mine) // batch_size)]


class PairImages(Dataset):
    """(index, model-ready pixels, caption) of a pair; decoding happens in the workers."""

    def __init__(self, pairs: list, image_inputs=None):
        self.pairs, self.image_inputs = pairs, image_inputs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        pair = self.pairs[i]
        pixels = self.image_inputs(load_image(pair.image)) if self.image_inputs else torch.zeros(0)
        return i, pixels, pair.caption


def loader(pairs: list, image_inputs, batches: list, workers: int, seed: int) -> DataLoader:
    """Batches of (indices, pixels, captions) in the given order, decoded by `workers`
    processes (0: in this one). Its own generator: worker seeds never touch the global RNG."""
    return DataLoader(PairImages(pairs, image_inputs), batch_sampler=batches,
                      num_workers=workers if image_inputs else 0,
                      generator=torch.Generator().manual_seed(seed),
                      pin_memory=torch.cuda.is_available())
