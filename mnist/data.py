"""Datasets held in memory as uint8 tensors, batched by index; torchvision only downloads them.

The course's pipeline converts and normalises every sample in Python through a DataLoader;
here the whole split is one tensor and each batch is one indexing operation, so an epoch
costs little more than the model's own forward and backward passes. Training reads the four
unpacked IDX files (mnist.datafiles has checked them) straight into tensors, without torchvision:
a job's start is then `import torch` and the read. torchvision's classes download (login node, laptop).

    python -m mnist.data download [data=fashion_mnist]    fetch, check, record sha256 sums (login node)
    python -m mnist.data verify   [data=...]              check what is on disk against them
    python -m mnist.data copy DIR [data=...]              take the four IDX files from DIR
"""
import sys

import torch

from mnist import datafiles, idx, registry
from mnist.datafiles import DataError


class InMemoryLoader:
    """Yields normalised (images, labels) batches from uint8 tensors; a seeded shuffle per epoch.

    `normalize` is (mean, std); with `shard` = (rank, world size) each process of a data-parallel
    run sees its own part.
    """

    def __init__(self, images, labels, batch_size, shuffle=False, seed=0, normalize=(0.0, 1.0), device="cpu",
                 shard=(0, 1)):
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.mean, self.std = normalize
        self.device = device
        self.rank, self.world_size = shard
        self.epoch = 0

    def set_epoch(self, epoch) -> None:
        self.epoch = epoch

    @property
    def dataset_size(self) -> int:
        return len(self.labels)

    def indices(self) -> torch.Tensor:
        n = len(self.labels)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        if self.world_size > 1:  # equal shards: ranks that take different numbers of steps wait forever
            order = order[: n // self.world_size * self.world_size]
        return order[self.rank::self.world_size].to(self.device)

    def __len__(self):
        per_rank = len(self.labels) // self.world_size if self.world_size > 1 else len(self.labels)
        return -(-per_rank // self.batch_size)

    def __iter__(self):
        order = self.indices()
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            # index_select: the same rows as images[batch], measurably faster on a CPU for small models
            images = self.images.index_select(0, batch).unsqueeze(1).float().div_(255).sub_(self.mean).div_(self.std)
            yield images, self.labels.index_select(0, batch)


def read_idx(path) -> torch.Tensor:
    """An unpacked IDX file of unsigned bytes as a uint8 tensor of the dims its header declares."""
    dims = idx.read_dims(path)
    with open(path, "rb") as f:
        body = bytearray(f.read())  # writable: torch.frombuffer shares it, without a copy or a warning
    return torch.frombuffer(body, dtype=torch.uint8, offset=4 + 4 * len(dims)).view(*dims)


_SPLITS = {}  # (root, name, train) -> (images, labels): the runs of a packed task read the data once


def load_split(data_cfg, train) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's images (N, 28, 28) uint8 and labels (N,) int64, from the unpacked IDX files."""
    key = (str(data_cfg.root), data_cfg.name, bool(train))
    if key not in _SPLITS:
        raw = datafiles.raw_folder(data_cfg.root, data_cfg.name)
        images, labels = datafiles.SPLITS["train" if train else "test"]
        _SPLITS[key] = read_idx(raw / images), read_idx(raw / labels).long()
    return _SPLITS[key]


def ensure_dataset(data_cfg) -> dict[str, int]:
    """Have the dataset on disk and whole. A local run downloads what is missing first (data.download=auto,
    the default); a Slurm job never does (compute nodes often have no internet): it stops, naming the command."""
    if datafiles.will_download(data_cfg):
        where = datafiles.raw_folder(data_cfg.root, data_cfg.name)
        print(f"The {data_cfg.name} dataset is not in {where}: downloading it first "
              f"(data.download=false turns this off).", file=sys.stderr, flush=True)
        download(data_cfg)
    return datafiles.prepare(data_cfg.root, data_cfg.name)


def loaders(data_cfg, seed, device, rank=0, world_size=1) -> tuple[InMemoryLoader, InMemoryLoader]:
    """The training loader (this rank's shard) and the test loader (the whole test set)."""
    ensure_dataset(data_cfg)
    common = dict(normalize=(data_cfg.mean, data_cfg.std), device=device)
    train_loader = InMemoryLoader(*load_split(data_cfg, train=True), data_cfg.batch_size, shuffle=data_cfg.shuffle,
                                  seed=seed, shard=(rank, world_size), **common)
    test_loader = InMemoryLoader(*load_split(data_cfg, train=False), data_cfg.test_batch_size, **common)
    return train_loader, test_loader


def download(data_cfg) -> dict[str, int]:
    """torchvision's download (which checks each file's md5 sum) into a staging folder, then our own
    checks, then the files moved into place with their sha256 sums. One process at a time per
    dataset and data.root: the others wait, then find it done."""
    root, name = data_cfg.root, data_cfg.name
    with datafiles.writing(root, name) as stage:
        sizes = datafiles.done(root, name)
        if sizes:
            return sizes
        from torchvision import datasets  # only to download: training never imports it

        try:
            getattr(datasets, registry.DATASETS[name])(stage, train=True, download=True)
        except (RuntimeError, OSError) as e:
            lines = str(e).strip().splitlines() or [type(e).__name__]
            reason = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"  # what, and the last cause
            raise DataError(f"Downloading {name} into {root} failed ({reason}). "
                            f"{datafiles.fetch_hint(name, offer_download=False)}.") from None
        return datafiles.install(stage, root, name, origin=datafiles.raw_folder(root, name))


def main(argv=None) -> int:
    from mnist.config import compose, report_errors

    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("download", "verify", "copy")
    if not argv or argv[0] not in commands:
        print(__doc__.split("\n\n", 2)[2].rstrip(), file=sys.stderr)
        return 2
    command, args = argv[0], argv[1:]
    with report_errors():
        source = None
        if command == "copy":
            if not args or "=" in args[0]:
                raise DataError("`python -m mnist.data copy` needs the folder to copy from, e.g. "
                                "`python -m mnist.data copy /usr/share/datasets/fashion-mnist data=fashion_mnist`.")
            source, args = args[0], args[1:]
        data_cfg = compose(args).data
        where = datafiles.raw_folder(data_cfg.root, data_cfg.name)
        if command == "verify":
            sizes, summed = datafiles.verify(data_cfg.root, data_cfg.name)
        elif command == "download":
            sizes, summed = download(data_cfg), True
        else:
            sizes, summed = datafiles.copy_from(source, data_cfg.root, data_cfg.name), True
        how = f"sha256 sums match {where / datafiles.SUMS}" if summed else (
            f"structure only: {where} has no {datafiles.SUMS}; `python -m mnist.data download "
            f"data={data_cfg.name}` records it")
        print(f"{data_cfg.name}: {sizes['train']} training and {sizes['test']} test images, checked ({how})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
