"""Shards to model-input rows, in Ray tasks, with the gateway's own decoder and preprocessing.

Each image goes through ``serving.preprocess.prepare_image`` (which decodes with
``serving.images.decode_encoded``: the format allow-list, the pixel-count guard against decompression
bombs, channel conversion) and the model's default resize op, exactly as an ``Embed`` request with
that image would. An image that fails becomes a row with ``error`` set; a shard ends with one
*marker* row (``seq = -1``) whose ``count`` says how many inputs the shard had, so the driver knows
when every row of a shard has arrived.

Row columns: ``shard`` int64, ``seq`` int64 (position in the shard), ``id`` str, ``error`` str ("" when
decoded), ``count`` int64 (marker rows only, else -1), ``pixels`` uint8 ``[H, W, C]`` (zeros unless
decoded).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from protos import vitserve_pb2
from serving.images import ImageError
from serving.preprocess import prepare_image

from embed_dataset.model import EmbedModel
from embed_dataset.sources import Item, Shard, SourcePlan, read_shard

Batch = dict[str, np.ndarray]
MARKER_SEQ = -1


def decode_item(item: Item, model: EmbedModel, max_pixels: int) -> tuple[np.ndarray | None, str]:
    """``(pixels [H, W, C] uint8, "")`` for a decodable item, else ``(None, reason)``."""
    if item.data is None:
        return None, item.error
    try:
        pixels, _ = prepare_image(item.seq, vitserve_pb2.Image(encoded=item.data), model.geometry,
                                  model.preprocess, model.resize_op, max_pixels)
    except ImageError as e:
        return None, e.problem
    except Exception as e:  # noqa: BLE001 - a decoder crash on one file must not end the job
        return None, f"cannot decode ({type(e).__name__}): {e}"
    return pixels, ""


class _Rows:
    """Rows of one output batch being filled."""

    def __init__(self, shard: int, model: EmbedModel) -> None:
        self.shard, self.model = shard, model
        self.seq: list[int] = []
        self.ids: list[str] = []
        self.errors: list[str] = []
        self.counts: list[int] = []
        self.pixels: list[np.ndarray | None] = []

    def add(self, seq: int, item_id: str, pixels: np.ndarray | None, error: str, count: int = -1) -> None:
        self.seq.append(seq)
        self.ids.append(item_id)
        self.errors.append(error)
        self.counts.append(count)
        self.pixels.append(pixels)

    def __len__(self) -> int:
        return len(self.seq)

    def batch(self) -> Batch:
        g = self.model.geometry
        pixels = np.zeros((len(self), g.height, g.width, g.channels), np.uint8)
        for i, p in enumerate(self.pixels):
            if p is not None:
                pixels[i] = p
        return {"shard": np.full(len(self), self.shard, np.int64), "seq": np.asarray(self.seq, np.int64),
                "id": np.asarray(self.ids, dtype=object), "error": np.asarray(self.errors, dtype=object),
                "count": np.asarray(self.counts, np.int64), "pixels": pixels}


def decode_shard(plan: SourcePlan, shard: Shard, model: EmbedModel, block_rows: int,
                 max_pixels: int) -> Iterator[Batch]:
    """Blocks of ``block_rows`` decoded rows of ``shard``; the last one ends with the marker row."""
    rows = _Rows(shard.index, model)
    count = 0
    for item in read_shard(plan, shard):
        pixels, error = decode_item(item, model, max_pixels)
        rows.add(item.seq, item.id, pixels, error)
        count += 1
        if len(rows) == block_rows:
            yield rows.batch()
            rows = _Rows(shard.index, model)
    rows.add(MARKER_SEQ, "", None, "", count)
    yield rows.batch()


def decode_shards(batch: Batch, plan: SourcePlan, model: EmbedModel, block_rows: int,
                  max_pixels: int) -> Iterator[Batch]:
    """Ray Data ``map_batches`` function: ``batch["shard"]`` holds shards as JSON; yields their rows."""
    for text in batch["shard"]:
        yield from decode_shard(plan, Shard.from_json(str(text)), model, block_rows, max_pixels)
