from protos import generate, vitserve_pb2


def test_generated_stubs_are_fresh():
    assert generate.main(["--check"]) == 0, "run `python -m protos.generate` and commit the result"


def test_tensor_round_trip():
    t = vitserve_pb2.Tensor(data=b"\x00" * 8, shape=[2, 1], dtype=vitserve_pb2.FLOAT32)
    assert vitserve_pb2.Tensor.FromString(t.SerializeToString()) == t
