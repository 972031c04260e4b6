"""Names shared by the exporter, the gateway and the client: tensors, files, lanes, config keys."""

from __future__ import annotations

# Triton tensors of every vitserve model (docs/CONTRACTS.md)
INPUT_NAME = "images"
CLS_OUTPUT = "cls"
PATCH_OUTPUT = "patch_tokens"
REGISTERS_OUTPUT = "registers"
MEAN_PATCH_OUTPUT = "mean_patch"
# [N, heads, h*w]: the last block's CLS-query attention over the patch keys (export --attention)
ATTENTION_OUTPUT = "cls_attention"
DEFAULT_OUTPUTS = (CLS_OUTPUT, PATCH_OUTPUT)

# one model-repository entry: REPO/<name>/{config.pbtxt, manifest.json, <version>/...}
MANIFEST_FILENAME = "manifest.json"
CONFIG_FILENAME = "config.pbtxt"
# config.pbtxt string parameter carrying the manifest as compact JSON (the gateway reads only configs)
MANIFEST_PARAMETER = "vitserve_manifest"

LANES = ("throughput", "latency")


def layer_output_name(layer: int) -> str:
    """``patch_tokens_l<layer>``: the output holding the patch tokens after block ``layer`` (as given)."""
    return f"{PATCH_OUTPUT}_l{layer}"


def is_token_output(name: str) -> bool:
    """True for outputs shaped like ``patch_tokens`` (``[h*w, D]`` per image)."""
    return name == PATCH_OUTPUT or name.startswith(PATCH_OUTPUT + "_l")
