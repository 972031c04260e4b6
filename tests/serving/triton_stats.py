"""How many inferences Triton ran: its statistics API, so tests can prove a refused call cost none."""

from __future__ import annotations

import tritonclient.grpc as tritongrpc


def inference_count(triton_url: str, model: str) -> int:
    """Inference requests Triton received for ``model`` (successful plus failed)."""
    client = tritongrpc.InferenceServerClient(triton_url)
    try:
        stats = client.get_inference_statistics(model, as_json=True)
    finally:
        client.close()
    (entry,) = [s for s in stats["model_stats"] if s["name"] == model]
    inference = entry.get("inference_stats", {})
    return int(inference.get("success", {}).get("count", 0)) + int(inference.get("fail", {}).get("count", 0))
