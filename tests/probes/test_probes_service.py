"""The service (Triton + gateway) and the in-process encoder give the same probe numbers."""

import pytest

from probes.evaluate import load_probe_data, probe_source
from probes.linear import LinearProtocol
from probes.sources import ServiceSource, SourceError, TorchEncoderSource

pytestmark = pytest.mark.slow


def test_service_and_in_process_probe_scores_agree(probe_service, small_run, small_export):
    # 2000 test images: one flipped prediction is 0.05 points. One L2 strength (1e-2: at 1e-3 the fit is
    # ill-conditioned enough on some CPUs that 3 predictions flip on the same inputs), fitted to convergence:
    # the optimum of a strictly convex problem moves only by the ~1e-6 feature differences, while a
    # truncated fit or a near-tie in the L2 search could amplify them.
    data = load_probe_data(limit_train=2000, limit_test=2000, train_scenes=80, test_scenes=40)
    protocol = LinearProtocol(l2_grid=(1e-2,), max_iter=500)
    local = probe_source(TorchEncoderSource.from_run_dir(small_run), data, protocol=protocol, batch=128)
    service = ServiceSource(probe_service, small_export.name)
    try:
        served = probe_source(service, data, protocol=protocol, batch=128)
    finally:
        service.close()
    # last4 needs the CLS of earlier blocks, which Embed/Features do not return: skipped, with the reason
    assert set(served.scores) == set(local.scores) - {"linear_last4_top1"}
    assert len(served.scores) == 6 and "Embed and Features" in served.skipped["last4"]
    for k, v in served.scores.items():
        assert abs(local.scores[k] - v) <= 0.1, (k, local.scores[k], v)


def test_service_source_names_a_missing_model(probe_service):
    with pytest.raises(SourceError, match="serves no model 'nope'.*probe_tiny"):
        ServiceSource(probe_service, "nope")
