"""Which Triton entry runs a request: the resolution bucket that fits its images, and version order.

Pure functions over protobuf messages; ``serving.registry.ModelRegistry.resolve_request`` applies them.
"""

from __future__ import annotations

from typing import Sequence

from protos import vitserve_pb2
from serving.preprocess import read_header


def version_key(version: str) -> tuple[int, str]:
    """Sort key of Triton version strings: numerically ("10" after "9")."""
    return (int(version), "") if version.isdigit() else (-1, version)


def image_sizes(images: Sequence[vitserve_pb2.Image]) -> list[tuple[int, int]]:
    """``(height, width)`` of each request image whose size can be read without decoding (raw
    frames; encoded files by their header). Unreadable ones are left out: decoding reports them."""
    sizes = []
    for im in images:
        if im.WhichOneof("source") == "raw":
            sizes.append((int(im.raw.height), int(im.raw.width)))
        elif im.WhichOneof("source") == "encoded":
            header = read_header(im.encoded)
            if header is not None:
                sizes.append((header[1], header[0]))
    return sizes


def choose_bucket(buckets: Sequence[vitserve_pb2.ResolutionBucket],
                  sizes: Sequence[tuple[int, int]]) -> vitserve_pb2.ResolutionBucket:
    """The bucket for images of ``sizes`` (``(h, w)``): the smallest bucket whose shorter side is at
    least the largest shorter side among the images; if none is that large, the largest bucket.
    Ties go to the smaller area. No readable size: the smallest bucket."""
    def key(b: vitserve_pb2.ResolutionBucket) -> tuple[int, int]:
        return min(b.height, b.width), b.height * b.width

    need = max((min(h, w) for h, w in sizes), default=0)
    fitting = [b for b in buckets if min(b.height, b.width) >= need]
    return min(fitting, key=key) if fitting else max(buckets, key=key)
