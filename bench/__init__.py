"""Benchmarks of served and in-process encoders driven by MLPerf LoadGen (``vitserve bench``)."""
