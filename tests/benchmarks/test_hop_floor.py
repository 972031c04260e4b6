"""benchmarks.hop_floor runs both echo servers for real and prints a p50 for each."""

import re

from benchmarks import hop_floor


def test_hop_floor_prints_a_p50_per_server(capsys):
    assert hop_floor.main(["--calls", "50", "--bytes", "100"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in lines] == ["grpc.aio server", "thread-pool server"]
    for line in lines:
        p50 = float(re.search(r"p50 ([0-9.]+) ms", line).group(1))
        assert p50 > 0
