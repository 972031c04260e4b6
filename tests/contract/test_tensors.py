"""The tensor codec shared by the gateway (writer) and the client (reader)."""

from __future__ import annotations

import numpy as np
import pytest

from contract.tensors import TensorError, tensor_to_numpy, to_tensor
from protos import vitserve_pb2


@pytest.mark.parametrize("dtype, np_dtype", [(vitserve_pb2.FLOAT32, np.float32), (vitserve_pb2.FLOAT16, np.float16),
                                             (vitserve_pb2.DTYPE_UNSPECIFIED, np.float32)])
def test_round_trip_little_endian(dtype, np_dtype):
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float64)
    t = to_tensor(x, dtype)
    assert list(t.shape) == [2, 3, 4]
    assert t.dtype == (vitserve_pb2.FLOAT16 if np_dtype == np.float16 else vitserve_pb2.FLOAT32)
    assert t.data == x.astype(np.dtype(np_dtype).newbyteorder("<")).tobytes()
    y = tensor_to_numpy(t)
    assert y.dtype == np_dtype and y.dtype.isnative
    np.testing.assert_array_equal(y, x.astype(np_dtype))


def test_bad_tensors_raise():
    with pytest.raises(TensorError, match="unknown tensor dtype 9"):
        to_tensor(np.zeros(2), 9)
    with pytest.raises(TensorError, match="needs 24 bytes, got 8"):
        tensor_to_numpy(vitserve_pb2.Tensor(data=b"\0" * 8, shape=[2, 3], dtype=vitserve_pb2.FLOAT32))
