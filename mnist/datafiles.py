"""A dataset's files on disk: where they live, whether they are whole, unpacking `.gz` copies.

Stdlib only: the login node checks data with this before submitting, without torch.
The layout is torchvision's (<root>/MNIST/raw/, <root>/FashionMNIST/raw/), so its dataset
classes read what this module prepares.

Many readers at once (array tasks, local runs) need no lock: every file is written under a
temporary name and renamed into place. Writers (`download`, `copy`) hold `<root>/.<Folder>.lock`,
stage the files beside the dataset, check them, move them in, and record their sha256 sums in
`<raw>/SHA256SUMS`, which `verify` compares against. A writer that fails removes its lock file.
"""
import errno
import fcntl
import filecmp
import gzip
import hashlib
import os
import shutil
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mnist import atomic, env, registry
from mnist.errors import UserError
from mnist.idx import IdxError, max_value, read_dims

SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FILES = [f for pair in SPLITS.values() for f in pair]
SUMS = "SHA256SUMS"


class DataError(UserError):
    pass


def raw_folder(root, name) -> Path:
    return Path(root) / registry.DATASETS[name] / "raw"


def fetch_hint(name, offer_download=True) -> str:
    if env.in_slurm_job():  # a compute node: jobs never download
        return (
            f"Jobs never download: on the login node, fetch it with `python -m mnist.data download data={name}` "
            f"(or `make data DATA={name}`), or copy the four IDX files (gzipped or not) with "
            f"`python -m mnist.data copy SOURCE_DIR data={name}`, into the same data.root, then submit again"
        )
    hint = (
        f"Fetch it on a machine with internet with `python -m mnist.data download data={name}` "
        f"(or `make data DATA={name}`), or copy the four IDX files (gzipped or not) there with "
        f"`python -m mnist.data copy SOURCE_DIR data={name}`, or point data.root (or $MNIST_DATA) "
        f"at the folder that holds {registry.DATASETS[name]}/raw/"
    )
    return hint + ", or let a run here download it (data.download=auto)" if offer_download else hint


def will_download(data_cfg) -> bool:
    """Whether a run fetches the dataset first: data.download=auto (or true), some file missing,
    and not inside a Slurm job (jobs never download: compute nodes often have no internet)."""
    wanted = data_cfg.download == "auto" or data_cfg.download is True
    return bool(wanted and not env.in_slurm_job() and missing_files(data_cfg.root, data_cfg.name))


def missing_files(root, name) -> list[str]:
    """The files that are neither unpacked nor gzipped under the raw folder: a cheap check."""
    raw = raw_folder(root, name)
    return [f for f in FILES if not (raw / f).exists() and not (raw / f"{f}.gz").exists()]


def check_present(root, name) -> None:
    missing = missing_files(root, name)
    if missing:
        raise DataError(
            f"The {name} dataset is not in {raw_folder(root, name)}: missing {', '.join(missing)}. "
            f"{fetch_hint(name)}."
        )


def check_on_login_node(root, name) -> None:
    """What a submit checks before any job starts, cheaply and without torch: every file there,
    each one's IDX header against its size (a `.gz` copy: against the size in its gzip trailer),
    28x28 images, as many labels as images. Raises DataError naming the command that fixes it.
    """
    raw = raw_folder(root, name)
    hint = (f"Jobs never download: on the login node run `python -m mnist.data download data={name}` "
            f"(or `make data DATA={name}`; without internet `make data DATA={name} SOURCE=DIR` copies the "
            f"four IDX files from DIR), check it with `python -m mnist.data verify data={name}`, then submit again")
    missing = missing_files(root, name)
    if missing:
        raise DataError(f"The {name} dataset is not in {raw}: missing {', '.join(missing)}. {hint}.")
    try:
        for images, labels in SPLITS.values():
            _check_dims(*(raw / f if (raw / f).exists() else raw / f"{f}.gz" for f in (images, labels)))
    except (IdxError, OSError) as e:
        raise DataError(f"{e}. {hint}.") from None


def prepare(root, name) -> dict[str, int]:
    """Make sure the four unpacked IDX files are in place and whole; unpack `.gz` copies.

    Returns the sizes {split: count}. Cheap (no hashing: `verify` does that). Safe to run from
    many processes at once: each one unpacks into its own temporary file and renames it into place.
    """
    check_present(root, name)
    raw = raw_folder(root, name)
    for f in FILES:
        if not (raw / f).exists():
            _unpack(raw / f"{f}.gz", raw / f, name)
    sizes = {}
    for split, (images, labels) in SPLITS.items():
        try:
            sizes[split] = _check_dims(raw / images, raw / labels)
            top = max_value(raw / labels)
            if top > 9:
                raise IdxError(f"{raw / labels} holds label {top}; MNIST labels are 0..9")
        except IdxError as e:
            raise DataError(f"{e}. Delete the bad file. {fetch_hint(name)}.") from None
    return sizes


def _unpack(source, target, name):
    def write(tmp):
        with gzip.open(source, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        read_dims(tmp)

    try:
        atomic.write_whole(target, write)
    except (OSError, EOFError, zlib.error, IdxError) as e:
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise DataError(
                f"Cannot unpack {source} into {target.parent}: {e.strerror}. Point data.root at a folder "
                f"you can write, or unpack the files there once yourself (`gunzip -k {target.parent}/*.gz`)."
            ) from None
        raise DataError(f"{source} is corrupt ({e}). Delete it. {fetch_hint(name)}.") from None


def _check_dims(images, labels):
    """The number of images, once both files' headers agree with their sizes and with each other."""
    image_dims, label_dims = read_dims(images), read_dims(labels)
    if len(image_dims) != 3 or image_dims[1:] != (28, 28):
        raise IdxError(f"{images} holds images of shape {image_dims[1:]}, not 28x28")
    if len(label_dims) != 1:
        raise IdxError(f"{labels} has {len(label_dims)} dimensions, labels have 1")
    if image_dims[0] != label_dims[0]:
        raise IdxError(f"{images} holds {image_dims[0]} images but {labels} holds {label_dims[0]} labels")
    return image_dims[0]


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(root, name) -> tuple[dict[str, int], bool]:
    """prepare()'s checks, then each unpacked file's sha256 against <raw>/SHA256SUMS if there is one.

    Returns (sizes, whether SHA256SUMS was there to compare against).
    """
    sizes = prepare(root, name)
    raw = raw_folder(root, name)
    if not (raw / SUMS).exists():
        return sizes, False
    lines = (raw / SUMS).read_text(errors="replace").splitlines()
    recorded = {f: digest for digest, _, f in (line.partition("  ") for line in lines)}
    changed = [str(raw / f) for f in FILES if recorded.get(f) != sha256(raw / f)]
    if changed:
        raise DataError(
            f"{', '.join(changed)} changed since {raw / SUMS} was written (corrupt, truncated or replaced: "
            f"the sha256 sum differs). Fetch the dataset again with `python -m mnist.data download data={name}` "
            f"(or `make data DATA={name}`), or copy it again with `python -m mnist.data copy SOURCE_DIR data={name}`."
        )
    return sizes, True


@contextmanager
def writing(root, name) -> Iterator[Path]:
    """Hold the dataset's lock (a racing writer waits here) and yield a staging folder beside it.

    Staging folders that a killed writer left behind are removed, since no one else is writing.
    """
    root = Path(root)
    lock = root / f".{registry.DATASETS[name]}.lock"
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle = _locked(lock)
    except OSError as e:
        raise DataError(
            f"Cannot write to the data folder {root}: {e.strerror}. Point data.root (or $MNIST_DATA) "
            f"at a folder you can write, e.g. data.root=$HOME/data."
        ) from None
    with handle:
        for old in root.glob(f".{registry.DATASETS[name]}.staging-*"):
            shutil.rmtree(old, ignore_errors=True)
        stage = root / f".{registry.DATASETS[name]}.staging-{os.getpid()}"
        try:
            yield stage
        except BaseException:
            lock.unlink(missing_ok=True)  # a failed writer leaves nothing behind (still holding it: see _locked)
            raise
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def _locked(lock):
    """An open handle on the file `lock`, holding its exclusive flock.

    A failed writer removes the lock file while holding it; a writer that was waiting on that file
    then holds a lock no newcomer sees, so it lets go and locks the file now at that path instead.
    """
    while True:
        handle = open(lock, "a")
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            if os.path.samestat(os.fstat(handle.fileno()), os.stat(lock)):
                return handle
        except FileNotFoundError:
            pass
        handle.close()


def done(root, name) -> dict[str, int] | None:
    """Inside writing(): the sizes if the dataset is already there and whole, else None.

    Whole files without SHA256SUMS (placed by hand, or by an older version) get theirs recorded now.
    """
    try:
        sizes, summed = verify(root, name)
    except DataError:
        return None
    if not summed:
        _write_sums(raw_folder(root, name))
    return sizes


def install(stage, root, name, origin) -> dict[str, int]:
    """Inside writing(): check the files staged in raw_folder(stage), move them into place, record their sums.

    `origin` names where they came from in error messages (the staging folder means nothing to a user).
    """
    staged, raw = raw_folder(stage, name), raw_folder(root, name)
    try:
        sizes = prepare(stage, name)
    except DataError as e:
        raise DataError(str(e).replace(str(staged), str(origin))) from None
    _write_sums(staged)
    try:
        raw.mkdir(parents=True, exist_ok=True)
        for f in FILES:
            os.replace(staged / f, raw / f)
            if (staged / f"{f}.gz").exists():
                os.replace(staged / f"{f}.gz", raw / f"{f}.gz")
            else:  # a stale .gz of other data must not be unpacked later
                (raw / f"{f}.gz").unlink(missing_ok=True)
        os.replace(staged / SUMS, raw / SUMS)
    except OSError as e:
        raise DataError(f"Cannot write into {raw}: {e.strerror}. Point data.root (or $MNIST_DATA) at a folder "
                        f"you can write, e.g. data.root=$HOME/data.") from None
    return sizes


def _write_sums(raw):
    sums = "".join(f"{sha256(raw / f)}  {f}\n" for f in FILES)  # the format of `sha256sum -c`
    atomic.write_whole(raw / SUMS, lambda tmp: tmp.write_text(sums))


def copy_from(source, root, name) -> dict[str, int]:
    """Copy the four IDX files (gzipped or not) from a local folder, check them, record their sums.

    A copy racing another waits for it, then finds the same files in place and does nothing.
    """
    source = Path(source)
    found = []
    for f in FILES:
        candidates = [p for p in (source / f, source / f"{f}.gz") if p.is_file()]
        if not candidates:
            raise DataError(f"{source} has no {f} (or {f}.gz). Name the folder that holds the four IDX files.")
        found.append(candidates[0])
    raw = raw_folder(root, name)
    with writing(root, name) as stage:
        try:
            if all((raw / p.name).is_file() and filecmp.cmp(p, raw / p.name, shallow=False) for p in found):
                sizes = done(root, name)
                if sizes:
                    return sizes
            raw_folder(stage, name).mkdir(parents=True)
            for p in found:
                shutil.copyfile(p, raw_folder(stage, name) / p.name)
        except OSError as e:
            raise DataError(f"Cannot copy {e.filename}: {e.strerror}. Name a folder you can read and a "
                            f"data.root you can write.") from None
        return install(stage, root, name, origin=source)
