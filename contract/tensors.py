"""numpy arrays <-> ``vitserve.v1.Tensor`` (raw little-endian bytes with shape and dtype)."""

from __future__ import annotations

import numpy as np

from protos import vitserve_pb2

# proto dtype -> little-endian numpy dtype (DTYPE_UNSPECIFIED is float32, as the proto says)
NUMPY_DTYPES = {vitserve_pb2.FLOAT32: np.dtype("<f4"), vitserve_pb2.FLOAT16: np.dtype("<f2"),
                vitserve_pb2.DTYPE_UNSPECIFIED: np.dtype("<f4")}


class TensorError(ValueError):
    """A tensor whose dtype is unknown or whose bytes do not fill its shape."""


def numpy_dtype(dtype: int) -> np.dtype:
    """The little-endian numpy dtype of proto ``dtype`` (``DTYPE_UNSPECIFIED`` means float32)."""
    try:
        return NUMPY_DTYPES[dtype]
    except KeyError:
        raise TensorError(f"unknown tensor dtype {dtype}") from None


def to_tensor(array: np.ndarray, dtype: int) -> vitserve_pb2.Tensor:
    """``array`` as a ``Tensor`` of proto ``dtype`` (FLOAT32 or FLOAT16; unspecified: FLOAT32)."""
    np_dtype = numpy_dtype(dtype)
    out = np.ascontiguousarray(array, dtype=np_dtype)
    return vitserve_pb2.Tensor(data=out.tobytes(), shape=list(out.shape),
                               dtype=vitserve_pb2.FLOAT16 if np_dtype.itemsize == 2 else vitserve_pb2.FLOAT32)


def tensor_to_numpy(tensor: vitserve_pb2.Tensor) -> np.ndarray:
    """The array a ``Tensor`` carries, in native byte order."""
    dtype = numpy_dtype(tensor.dtype)
    shape = tuple(tensor.shape)
    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != len(tensor.data):
        raise TensorError(f"tensor of shape {list(shape)} and dtype {dtype} needs "
                          f"{int(np.prod(shape, dtype=np.int64)) * dtype.itemsize} bytes, got {len(tensor.data)}")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
