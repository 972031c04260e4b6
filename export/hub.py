"""``--pretrained`` without a network: decide in seconds, before huggingface_hub's minute of retries.

timm loads pretrained weights with ``huggingface_hub.hf_hub_download``, which retries an unreachable
hub for about 50 s (five HEAD attempts with back-off) before it looks in its cache. Before the load,
``pretrained_plan`` finds where timm would take the weights from (``hf_hub_id`` with timm's file
names, or a torch-hub URL, or a local file), asks huggingface_hub's own cache reader
(``try_to_load_from_cache``) whether they are cached, and — unless huggingface_hub's offline mode
(``HF_HUB_OFFLINE``) already says so — checks with one short TCP connection whether the hub's endpoint
(``HF_ENDPOINT``, default https://huggingface.co) answers at all:

- cached: the load goes on; if the hub is unreachable it runs under huggingface_hub's offline mode
  (``offline_hub``), so no request is sent at all (huggingface_hub 2.4 falls back to a cached file
  quickly when the connection is refused, measured 0.4 s; offline mode also covers a hub whose
  packets are dropped, where each request would wait for its timeout);
- not cached and the hub unreachable (or offline mode on): ``ExportUsageError`` (exit 2) naming the
  cache looked in, the files and why the hub is unreachable;
- not cached, hub reachable: the load goes on and downloads.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from export.errors import ExportUsageError

CONNECT_TIMEOUT_S = 3.0


@dataclass
class PretrainedPlan:
    """Where timm would read ``name``'s pretrained weights and whether that can work here."""

    name: str
    where: str                     # hub id, URL or file
    files: list[str] = field(default_factory=list)
    cached: str | None = None      # path of the cached file, if any
    cache: str = ""                # where it was looked for
    offline_reason: str | None = None  # why the hub/URL cannot be reached; None: reachable or not needed


def _resolve(host: str, port: int, timeout: float) -> tuple[list, BaseException | None]:
    """``getaddrinfo`` bounded by ``timeout`` (it has no timeout of its own)."""
    result: list = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as e:
            error.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        return [], TimeoutError(f"name resolution of {host} took more than {timeout:g} s")
    return result, (error[0] if error else None)


def unreachable_reason(url: str, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """``None`` when a TCP connection to ``url``'s host and port opens within ``timeout``, else why not."""
    parsed = urlparse(url)
    host = parsed.hostname
    if not host:
        return f"{url!r} has no host"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    addresses, error = _resolve(host, port, timeout)
    if error is not None:
        return f"cannot resolve {host}: {error}"
    last: BaseException | None = None
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as s:
                s.settimeout(timeout)
                s.connect(address)
                return None
        except OSError as e:
            last = e
    return f"cannot connect to {host}:{port}: {last}"


def pretrained_plan(name: str, timeout: float = CONNECT_TIMEOUT_S) -> PretrainedPlan | None:
    """Where ``name``'s pretrained weights come from and whether they are cached or reachable;
    ``None`` when timm has no pretrained weights for it (the loader reports that)."""
    import timm
    from huggingface_hub import constants, try_to_load_from_cache
    from timm.models._hub import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME, hf_split

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.file:
        path = Path(cfg.file)
        return PretrainedPlan(name, str(path), [str(path)], str(path) if path.is_file() else None, "file system",
                              None if path.is_file() else f"local file {path} does not exist")
    if cfg.hf_hub_id:
        repo, revision = hf_split(cfg.hf_hub_id)
        # timm.models._hub.load_state_dict_from_hf: the safetensors file first, then the torch file
        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        if cfg.hf_hub_filename and cfg.hf_hub_filename.endswith(".bin"):
            files.insert(0, cfg.hf_hub_filename[:-4] + ".safetensors")
        cached = None
        for f in files:
            hit = try_to_load_from_cache(repo, f, revision=revision)
            if isinstance(hit, str):
                cached = hit
                break
        plan = PretrainedPlan(name, cfg.hf_hub_id, files, cached, f"Hugging Face cache {constants.HF_HUB_CACHE}")
        if constants.HF_HUB_OFFLINE:
            plan.offline_reason = "HF_HUB_OFFLINE is set (huggingface_hub's offline mode)"
        else:
            reason = unreachable_reason(constants.ENDPOINT, timeout)
            plan.offline_reason = f"the hub {constants.ENDPOINT} is unreachable: {reason}" if reason else None
        return plan
    if cfg.url:
        import torch.hub

        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        reason = None if path.is_file() else unreachable_reason(cfg.url, timeout)
        return PretrainedPlan(name, cfg.url, [path.name], str(path) if path.is_file() else None,
                              f"torch hub cache {path.parent}",
                              f"{cfg.url} is unreachable: {reason}" if reason else None)
    return None


def check_pretrained(name: str, timeout: float = CONNECT_TIMEOUT_S) -> PretrainedPlan | None:
    """``pretrained_plan``, raising ``ExportUsageError`` when the weights are neither cached nor reachable."""
    plan = pretrained_plan(name, timeout)
    if plan is None or plan.cached or plan.offline_reason is None:
        return plan
    raise ExportUsageError(
        f"pretrained weights for {name!r} ({plan.where}: {', '.join(plan.files)}) are not in the local "
        f"{plan.cache} and cannot be downloaded: {plan.offline_reason}. Download them where there is network "
        "access and pass --checkpoint FILE (or copy the cache here)")


@contextlib.contextmanager
def offline_hub(active: bool = True) -> Iterator[None]:
    """Run the block under huggingface_hub's offline mode (``constants.HF_HUB_OFFLINE``, which its HTTP
    layer reads on every request), so cached files are used without network retries."""
    from huggingface_hub import constants

    if not active:
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
