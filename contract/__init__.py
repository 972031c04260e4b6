"""The contract between vitserve's stages: what export writes and serving, clients and tools read.

Bottom layer (numpy and protobuf only, so the thin client can install it): tensor and file names
(``names``), the model manifest (``manifest``), the preprocessing spec (``preprocess``) and the
numpy <-> ``vitserve.v1.Tensor`` codec (``tensors``).
"""
