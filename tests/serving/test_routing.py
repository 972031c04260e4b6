"""The bucket rule and version order of ``serving.routing`` (pure functions, no Triton)."""

import io

import numpy as np
from PIL import Image

from protos import vitserve_pb2
from serving.routing import choose_bucket, image_sizes, version_key


def bucket(h: int, w: int) -> vitserve_pb2.ResolutionBucket:
    return vitserve_pb2.ResolutionBucket(height=h, width=w, grid_height=h // 16, grid_width=w // 16,
                                         model=f"m_{h}x{w}")


BUCKETS = [bucket(224, 224), bucket(336, 336), bucket(448, 448)]


def test_smallest_bucket_whose_shorter_side_covers_the_images():
    def chosen(*sizes):
        return choose_bucket(BUCKETS, sizes).height

    assert chosen((224, 224)) == 224                # exact fit
    assert chosen((225, 1000)) == 336               # shorter side 225: 224 is too small
    assert chosen((300, 400)) == 336 and chosen((400, 300)) == 336
    assert chosen((100, 50)) == 224                 # small images: the smallest bucket
    assert chosen((2000, 3000)) == 448              # larger than every bucket: the largest
    assert chosen((100, 100), (340, 500)) == 448    # the largest shorter side in the request decides
    assert chosen() == 224                          # no readable size: the smallest


def test_non_square_buckets_compare_by_shorter_side_then_area():
    buckets = [bucket(224, 320), bucket(256, 256), bucket(224, 224)]
    assert choose_bucket(buckets, [(200, 300)]).model == "m_224x224"  # same shorter side: smaller area
    assert choose_bucket(buckets, [(240, 240)]).model == "m_256x256"
    assert choose_bucket(buckets, [(999, 999)]).model == "m_256x256"


def test_image_sizes_from_raw_frames_and_headers():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((30, 50), np.uint8)).save(buf, format="PNG")
    images = [vitserve_pb2.Image(raw=vitserve_pb2.RawFrame(height=12, width=34, channels=1)),
              vitserve_pb2.Image(encoded=buf.getvalue()),
              vitserve_pb2.Image(encoded=b"not an image"), vitserve_pb2.Image()]
    assert image_sizes(images) == [(12, 34), (30, 50)]  # unreadable ones are left to the decoder


def test_versions_sort_numerically():
    assert sorted(["10", "2", "1"], key=version_key) == ["1", "2", "10"]
