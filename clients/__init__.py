"""The thin client: ``client`` (sync and ``grpc.aio``), ``messages`` (requests and results), ``commands`` (embed, features, admin)."""
