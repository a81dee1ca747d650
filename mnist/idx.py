"""The IDX file format of MNIST: a 4-byte magic number, the dims, then raw unsigned bytes.

Stdlib only, so the login-node path can check files without importing torch.
"""
import gzip
import math
import os
import struct
import zlib

UBYTE = 0x08


class IdxError(ValueError):
    pass


def write_idx(path, data: bytes, dims) -> None:
    """Write unsigned-byte IDX data of shape `dims`, e.g. (n, 28, 28) for images, (n,) for labels."""
    if len(data) != math.prod(dims):
        raise ValueError(f"{len(data)} bytes do not fill dims {tuple(dims)}")
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, UBYTE, len(dims)))
        f.write(struct.pack(f">{len(dims)}I", *dims))
        f.write(data)


def read_dims(path) -> tuple[int, ...]:
    """The dims an IDX file's header declares, checked against the file's size.

    A `.gz` copy is checked without unpacking it: the header is read from its first bytes and
    the size from its gzip trailer (which stores the unpacked size modulo 2**32).
    """
    path = str(path)
    gzipped = path.endswith(".gz")
    try:
        if gzipped:
            with open(path, "rb") as f:
                if f.read(2) != b"\x1f\x8b":
                    raise IdxError(f"{path} is not a gzip file")
                f.seek(max(os.path.getsize(path) - 4, 0))
                actual = int.from_bytes(f.read(4), "little")
        else:
            actual = os.path.getsize(path)
        with (gzip.open if gzipped else open)(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0:
                raise IdxError(f"{path} is not an IDX file (magic number {head.hex() or 'missing'})")
            if head[2] != UBYTE:
                raise IdxError(f"{path} holds IDX type 0x{head[2]:02x}, not unsigned bytes (0x08)")
            ndim = head[3]
            raw = f.read(4 * ndim)
            if len(raw) < 4 * ndim:
                raise IdxError(f"{path} is truncated inside its header")
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise IdxError(f"{path} is not a whole gzip file ({e})") from None
    dims = struct.unpack(f">{ndim}I", raw)
    expected = 4 + 4 * ndim + math.prod(dims)
    if actual != (expected % 2**32 if gzipped else expected):
        size = f"records {actual} bytes unpacked" if gzipped else f"is {actual} bytes"
        raise IdxError(f"{path} {size} but its header {dims} needs {expected} (truncated or corrupt)")
    return dims


def max_value(path) -> int:
    """The largest byte stored in an IDX file's body (labels must be 0..9)."""
    ndim = len(read_dims(path))
    with open(path, "rb") as f:
        f.seek(4 + 4 * ndim)
        body = f.read()
    return max(body) if body else 0
