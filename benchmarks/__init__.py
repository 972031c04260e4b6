"""Reports, not library code: benchmarks of each stage and the probe comparison (`python -m benchmarks.NAME`)."""
