"""``vitserve serve --replicas N``: each replica's flags, and the refusals (no Triton started here)."""

from serving.replicas import replica_argv
from serving.server import _parser, main


def test_each_replica_gets_the_next_ports_and_the_same_other_flags():
    argv = ["--model-repository", "R", "--replicas", "3", "--port", "7000", "--health-port=8000",
            "--metrics-port", "0", "--drain-seconds", "5"]
    args = _parser().parse_args(argv)
    assert replica_argv(argv, args, 2) == ["--model-repository", "R", "--drain-seconds", "5", "--port", "7002",
                                           "--health-port", "8002", "--metrics-port", "0"]
    default = ["--model-repository", "R", "--replicas", "2"]
    assert replica_argv(default, _parser().parse_args(default), 1) == ["--model-repository", "R", "--port", "50052"]


def test_replicas_need_an_embedded_triton(capsys):
    assert main(["--triton-url", "127.0.0.1:8001", "--replicas", "2"]) == 2
    assert "--replicas starts one embedded Triton per replica" in capsys.readouterr().err
    assert main(["--model-repository", "R", "--replicas", "0"]) == 2
    assert "--replicas must be >= 1" in capsys.readouterr().err


def test_new_flags_are_checked():
    for argv in (["--drain-seconds", "-1"], ["--max-connection-age", "0"], ["--health-port", "70000"],
                 ["--repl", "2"]):  # no abbreviations: --replicas rewrites flags by their full names
        assert main(["--model-repository", "R", *argv]) == 2, argv
