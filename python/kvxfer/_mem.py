"""Memory and descriptor helpers shared by ``kvxfer`` and ``kvxfer.nixl``.

Torch is never imported here: a value can only be a ``torch.Tensor`` when
the application imported torch already, so ``sys.modules`` is consulted.
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple, Optional, Tuple

import numpy as np

_U64 = np.dtype("<u8")
_U32 = np.dtype("<u4")


class Memory(NamedTuple):
    """Where an object's bytes are: address, length, device id and kind."""

    addr: int
    length: int
    device: int
    kind: str


def is_tensor(obj: object) -> bool:
    """Whether ``obj`` is a ``torch.Tensor`` (without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def tensor_memory(t: Any) -> Memory:
    """The memory of a contiguous tensor (DRAM on device 0, or VRAM)."""
    if not t.is_contiguous():
        raise ValueError(
            f"tensor of shape {tuple(t.shape)} and strides {tuple(t.stride())} is not "
            "contiguous; pass a contiguous tensor"
        )
    dev = t.get_device()
    kind = "DRAM" if dev < 0 else "VRAM"
    return Memory(int(t.data_ptr()), int(t.numel() * t.element_size()), max(dev, 0), kind)


def memory_of(obj: Any) -> Memory:
    """The memory of a numpy array, a torch tensor or a writable buffer."""
    if is_tensor(obj):
        return tensor_memory(obj)
    if isinstance(obj, np.ndarray):
        arr = obj
    else:
        try:
            view = memoryview(obj)
        except TypeError:
            raise TypeError(
                f"cannot register an object of type {type(obj).__name__}: expected a numpy "
                "array, a torch tensor or a writable buffer (bytearray, mmap, memoryview)"
            ) from None
        if view.readonly:
            raise ValueError(
                f"{type(obj).__name__} memory is read-only; transfers write into registered "
                "memory, so pass a writable buffer"
            )
        arr = np.frombuffer(view, dtype=np.uint8) if view.nbytes else np.empty(0, np.uint8)
    if not (arr.flags.c_contiguous or arr.flags.f_contiguous):
        raise ValueError(
            f"numpy array of shape {arr.shape} and strides {arr.strides} is not contiguous"
        )
    if not arr.flags.writeable:
        raise ValueError("numpy array is read-only; transfers write into registered memory")
    return Memory(int(arr.__array_interface__["data"][0]), int(arr.nbytes), 0, "DRAM")


def pack_rows(rows: Any, what: str) -> Tuple[bytes, int]:
    """Packs descriptors for the native module.

    ``rows`` is an Nx2 or Nx3 array-like of (address, length[, device]);
    returns little-endian u64 triples and N.
    """
    arr = np.asarray(rows)
    if arr.ndim != 2 or arr.shape[1] not in (2, 3):
        raise ValueError(
            f"{what}: expected rows of (address, length) or (address, length, device), "
            f"got an array of shape {arr.shape}"
        )
    if arr.size and arr.dtype.kind not in "ui":
        raise TypeError(f"{what}: descriptor values must be integers, got dtype {arr.dtype}")
    if arr.size and arr.dtype.kind == "i" and (arr < 0).any():
        row = int(np.flatnonzero((arr < 0).any(axis=1))[0])
        raise ValueError(f"{what}: descriptor {row} has a negative value {tuple(arr[row])}")
    n = arr.shape[0]
    if arr.shape[1] == 3 and arr.dtype == _U64 and arr.flags.c_contiguous:
        return arr.tobytes(), n
    out = np.zeros((n, 3), dtype=_U64)
    out[:, : arr.shape[1]] = arr
    return out.tobytes(), n


def pack_indices(indices: Any, what: str) -> bytes:
    """Packs an index list (list or numpy array) as little-endian u32s."""
    if isinstance(indices, np.ndarray) and indices.dtype == _U32 and indices.ndim == 1:
        return indices.tobytes()
    arr = np.asarray(indices)
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected a flat list of indices, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "ui":
        raise TypeError(f"{what}: indices must be integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > 0xFFFFFFFF):
        bad = int(arr[(arr < 0) | (arr > 0xFFFFFFFF)][0])
        raise ValueError(f"{what}: index {bad} is out of range")
    return arr.astype(_U32).tobytes()


def strided_rows(rows: np.ndarray) -> np.ndarray:
    """Expands Nx5 strided rows (address, length, device, stride, count) into
    Nx3 explicit rows, block by block."""
    rows = np.asarray(rows, dtype=_U64)
    counts = rows[:, 4].astype(np.int64)
    total = int(counts.sum())
    out = np.empty((total, 3), dtype=_U64)
    start = 0
    for (addr, length, dev, stride, count) in rows.tolist():
        blocks = np.arange(count, dtype=_U64)
        out[start : start + count, 0] = addr + blocks * np.uint64(stride)
        out[start : start + count, 1] = length
        out[start : start + count, 2] = dev
        start += count
    return out


def as_bytes(msg: Optional[Any], what: str) -> Optional[bytes]:
    """A notification as bytes (str is UTF-8 encoded); empty means none."""
    if msg is None:
        return None
    if isinstance(msg, str):
        msg = msg.encode()
    elif not isinstance(msg, bytes):
        try:
            msg = bytes(msg)
        except TypeError:
            raise TypeError(
                f"{what} must be bytes or str, not {type(msg).__name__}"
            ) from None
    return msg or None
