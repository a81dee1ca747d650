"""A dataset's files on disk: where they live, whether they are whole, unpacking `.gz` copies.

Stdlib only: the login node checks data with this before submitting, without torch.
The layout is torchvision's (<root>/MNIST/raw/, <root>/FashionMNIST/raw/), so its dataset
classes read what this module prepares.
"""
import errno
import gzip
import os
import shutil
from pathlib import Path

from mnist.errors import UserError
from mnist.idx import IdxError, max_value, read_dims

FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}  # torchvision's class names
SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FILES = [f for pair in SPLITS.values() for f in pair]


class DataError(UserError):
    pass


def raw_folder(root, name):
    return Path(root) / FOLDERS[name] / "raw"


def fetch_hint(name):
    return (
        f"Fetch it on a machine with internet with `python -m mnist.data download data={name}` "
        f"(or `make data DATA={name}`), or copy the four IDX files (gzipped or not) there with "
        f"`python -m mnist.data copy SOURCE_DIR data={name}`, or point data.root (or $MNIST_DATA) "
        f"at the folder that holds {FOLDERS[name]}/raw/, or set data.download=true"
    )


def missing_files(root, name):
    """The files that are neither unpacked nor gzipped under the raw folder: a cheap check."""
    raw = raw_folder(root, name)
    return [f for f in FILES if not (raw / f).exists() and not (raw / f"{f}.gz").exists()]


def check_present(root, name):
    missing = missing_files(root, name)
    if missing:
        raise DataError(
            f"The {name} dataset is not in {raw_folder(root, name)}: missing {', '.join(missing)}. "
            f"{fetch_hint(name)}."
        )


def prepare(root, name):
    """Make sure the four unpacked IDX files are in place and whole; unpack `.gz` copies.

    Returns the sizes {split: count}. Safe to run from many processes at once: each one
    unpacks into its own temporary file and renames it into place.
    """
    check_present(root, name)
    raw = raw_folder(root, name)
    for f in FILES:
        if not (raw / f).exists():
            _unpack(raw / f"{f}.gz", raw / f, name)
    return {split: _check_split(raw, images, labels, name) for split, (images, labels) in SPLITS.items()}


def _unpack(source, target, name):
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with gzip.open(source, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        read_dims(tmp)
        os.replace(tmp, target)
    except (OSError, EOFError, IdxError) as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise DataError(
                f"Cannot unpack {source} into {target.parent}: {e.strerror}. Point data.root at a folder "
                f"you can write, or unpack the files there once yourself (`gunzip -k {target.parent}/*.gz`)."
            ) from None
        raise DataError(f"{source} is corrupt ({e}). Delete it. {fetch_hint(name)}.") from None


def _check_split(raw, images_file, labels_file, name):
    try:
        image_dims = read_dims(raw / images_file)
        label_dims = read_dims(raw / labels_file)
        if len(image_dims) != 3 or image_dims[1:] != (28, 28):
            raise IdxError(f"{raw / images_file} holds images of shape {image_dims[1:]}, not 28x28")
        if len(label_dims) != 1:
            raise IdxError(f"{raw / labels_file} has {len(label_dims)} dimensions, labels have 1")
        if image_dims[0] != label_dims[0]:
            raise IdxError(
                f"{raw / images_file} holds {image_dims[0]} images but {raw / labels_file} "
                f"holds {label_dims[0]} labels"
            )
        top = max_value(raw / labels_file)
        if top > 9:
            raise IdxError(f"{raw / labels_file} holds label {top}; MNIST labels are 0..9")
    except IdxError as e:
        raise DataError(f"{e}. Delete the bad file. {fetch_hint(name)}.") from None
    return image_dims[0]


def copy_from(source, root, name):
    """Copy the four IDX files (gzipped or not) from a local folder, then unpack and check them."""
    source = Path(source)
    raw = raw_folder(root, name)
    raw.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        found = [p for p in (source / f, source / f"{f}.gz") if p.exists()]
        if not found:
            raise DataError(f"{source} has no {f} (or {f}.gz). Name the folder that holds the four IDX files.")
        if found[0].suffix == ".gz":
            (raw / f).unlink(missing_ok=True)  # unpacked again from the new copy
        tmp = raw / f".{found[0].name}.{os.getpid()}.tmp"
        shutil.copyfile(found[0], tmp)
        os.replace(tmp, raw / found[0].name)
    return prepare(root, name)
