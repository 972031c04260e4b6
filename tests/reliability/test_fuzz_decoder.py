"""The gateway's decoding path alone, fuzzed at volume (no server: about a millisecond per case).

Every hostile file or raw frame from ``fuzz_cases`` goes through ``Decoder`` (the gateway's own
``serving.preprocess`` / ``serving.images`` path) for a grey and an RGB model input. It must either
give a uint8 batch of the model's shape or raise ``ImageError`` whose message starts with the
image's index; any other exception (a decoder crash the gateway would turn into UNKNOWN) fails.
``VITSERVE_DECODER_EXAMPLES`` sets the count (default 300).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.images import InputGeometry
from tests.reliability.conftest import MAX_PIXELS
from tests.reliability.fuzz_cases import OK, Decoder, image_cases, raw_cases

EXAMPLES = int(os.environ.get("VITSERVE_DECODER_EXAMPLES", "300"))


@pytest.mark.parametrize("channels", [1, 3])
def test_decoder_refuses_or_decodes_every_input(channels):
    decoder = Decoder(InputGeometry(28, 28, channels), MAX_PIXELS)
    seen = {"decoded": 0, "refused": 0}

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              derandomize="VITSERVE_DECODER_EXAMPLES" not in os.environ,
              suppress_health_check=list(HealthCheck))
    @given(case=st.one_of(image_cases(decoder), image_cases(decoder), raw_cases(decoder)))
    def one(case):
        # The strategies already ran the decoder: a non-ImageError exception has failed the test there.
        if case.codes == {OK}:
            assert case.pixels is not None and case.pixels.dtype == np.uint8
            assert case.pixels.shape == (len(case.images), 28, 28, channels)
            seen["decoded"] += 1
        else:
            assert case.pattern is not None and case.pattern.startswith(("^image 0", r"^image\ 0"))
            seen["refused"] += 1

    one()
    print(f"\ndecoder fuzz ({channels} channel(s)): {seen['decoded']} decoded, {seen['refused']} refused "
          f"with ImageError, 0 other exceptions")
    assert seen["decoded"] > 0 and seen["refused"] > 0
