"""``vitserve embed-dataset``: embed a folder, Parquet table or WebDataset shards on Ray Data.

``options`` (what a job is asked), ``model`` (the exported model or the gateways it runs on),
``sources`` (detecting and reading inputs, split into shards), ``decode`` (bytes to model input with
the gateway's own code), ``inference`` (the actor pool's ONNX Runtime or gateway calls), ``output``
(OUTDIR: identity, plan, the atomic commit of each shard), ``job`` (the Ray Data pipeline) and
``cli``. See docs/EMBED_DATASET.md.
"""
