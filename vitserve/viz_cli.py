"""``vitserve viz IMAGE... --target HOST:PORT --model A[,B...] --out FILE.png``: feature views of images
through a running service, drawn side by side into one PNG.

For each image and model, one row: the input, the PCA of its patch tokens as RGB (one basis per model
over all images of the call, ``clients.viz``), the foreground mask from the first component
(``--foreground``), and, when the model exports ``cls_attention`` (``vitserve export --attention``),
the CLS attention averaged over heads and per head; every map upsampled to the panel size. The maths
is ``clients.viz`` (numpy); this module draws (pillow, and matplotlib's colormaps: the ``viz`` extra).

Exit codes as the other client commands: 0 written, 1 the server refused a call (message printed,
e.g. an unknown model: NOT_FOUND), 2 usage errors (bad flags, unreadable images).
"""

from __future__ import annotations

import argparse
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw

from clients.client import VitServeClient
from clients.commands import _connection, _with_client
from clients.viz import FOREGROUND_THRESHOLD, FeatureViews, feature_views, upsample, upsample_rgb
from contract.names import ATTENTION_OUTPUT, PATCH_OUTPUT

PANEL = 112        # pixels per panel side
TITLE = 14         # pixels of title above each panel
LABEL_WIDTH = 150  # pixels of the row label on the left
ATTENTION_CMAP = "inferno"
BACKGROUND_TINT, BACKGROUND_ALPHA = (40, 60, 200), 0.6  # how the foreground panel marks background


@dataclass(frozen=True)
class ModelViews:
    """One model's views of all images of a call, and the grid they were computed on."""

    model: str
    views: FeatureViews
    grid: tuple[int, int]


def fetch_views(client: VitServeClient, images: Sequence[bytes | np.ndarray], model: str,
                foreground: bool = False, threshold: float = FOREGROUND_THRESHOLD,
                foreground_per_image: bool = True) -> ModelViews:
    """Features of ``images`` from ``model`` (with ``cls_attention`` when it exports it) and their views."""
    info = client.get_model(model)
    outputs = [PATCH_OUTPUT, ATTENTION_OUTPUT] if ATTENTION_OUTPUT in info.outputs else []
    res = client.features(list(images), model=info.name, layout="grid", outputs=outputs)
    views = feature_views(res.features, res.cls_attention, foreground, threshold, foreground_per_image)
    return ModelViews(info.name, views, tuple(res.grid))


def decode_image(data: bytes | np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 3]`` RGB of encoded bytes or a uint8 ``[H, W(, C)]`` array (grey repeated)."""
    if isinstance(data, (bytes, bytearray)):
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    a = np.asarray(data)
    a = a[..., None] if a.ndim == 2 else a
    return np.repeat(a[..., :1], 3, axis=-1) if a.shape[-1] != 3 else a


def _panel_of_image(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize((PANEL, PANEL), Image.Resampling.BILINEAR))


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255).round().astype(np.uint8)


def _heat(maps: np.ndarray) -> np.ndarray:
    """``[..., H, W]`` in [0, 1] -> uint8 RGB ``[..., H, W, 3]`` through the attention colormap."""
    return _to_uint8(colormaps[ATTENTION_CMAP](np.clip(maps, 0, 1))[..., :3])


def row_panels(image: np.ndarray, mv: ModelViews, i: int) -> list[tuple[str, np.ndarray]]:
    """(title, uint8 ``[PANEL, PANEL, 3]``) of image ``i``'s row for one model."""
    size = (PANEL, PANEL)
    v = mv.views
    panels = [("input", _panel_of_image(image)),
              ("PCA (RGB)", _to_uint8(upsample_rgb(v.pca[i:i + 1], size, "nearest")[0]))]
    if v.foreground is not None:  # the input, background patches tinted (DINOv2's "background removed")
        mask = upsample(v.foreground[i:i + 1].astype(np.float32), size, "nearest")[0][..., None]
        tinted = (1 - BACKGROUND_ALPHA) * panels[0][1] + BACKGROUND_ALPHA * np.asarray(BACKGROUND_TINT)
        panels.append(("foreground", (mask * panels[0][1] + (1 - mask) * tinted).round().astype(np.uint8)))
    if v.attention is not None and v.attention_heads is not None:
        panels.append(("attn mean", _heat(upsample(v.attention[i:i + 1], size)[0])))
        heads = upsample(v.attention_heads[i], size)
        panels += [(f"attn head {h}", _heat(heads[h])) for h in range(len(heads))]
    return panels


def render(images: Sequence[np.ndarray], names: Sequence[str], model_views: Sequence[ModelViews]) -> Image.Image:
    """One PIL image: a row per (image, model), panels left to right, titles above, labels left."""
    rows = [(f"{names[i]}\n{mv.model}", row_panels(images[i], mv, i))
            for i in range(len(images)) for mv in model_views]
    columns = max(len(p) for _, p in rows)
    height = TITLE + PANEL
    canvas = Image.new("RGB", (LABEL_WIDTH + columns * (PANEL + 4), len(rows) * (height + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, panels) in enumerate(rows):
        y = r * (height + 4)
        draw.multiline_text((4, y + TITLE + PANEL // 2 - 12), label, fill="black")
        for c, (title, pixels) in enumerate(panels):
            x = LABEL_WIDTH + c * (PANEL + 4)
            draw.text((x + 2, y + 1), title, fill="black")
            canvas.paste(Image.fromarray(pixels), (x, y + TITLE))
            draw.rectangle((x - 1, y + TITLE - 1, x + PANEL, y + TITLE + PANEL), outline=(160, 160, 160))
    return canvas


def write_views_png(out: Path, images: Sequence[bytes | np.ndarray], names: Sequence[str],
                    model_views: Sequence[ModelViews]) -> Path:
    """Render and save the PNG (parent directories created); returns ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    render([decode_image(x) for x in images], names, model_views).save(out, format="PNG")
    return out


def main(argv: list[str] | None = None) -> int:
    """``vitserve viz IMAGE... --model A[,B...] --out FILE.png [--foreground] [--threshold T]``."""
    p = argparse.ArgumentParser(prog="vitserve viz", description="Feature views (PCA of patch tokens, "
                                "foreground, CLS attention) of image files from a running service, as one PNG.")
    p.add_argument("images", nargs="+", type=Path, help="image files (PNG/JPEG/WebP/BMP)")
    p.add_argument("--model", default="", help="model name(s), comma-separated (may be omitted when only one is served)")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    p.add_argument("--foreground", action="store_true", help="also the foreground mask from the first PCA component")
    p.add_argument("--threshold", type=float, default=FOREGROUND_THRESHOLD,
                   help=f"foreground threshold on the scaled first component in [0, 1] (default {FOREGROUND_THRESHOLD})")
    p.add_argument("--foreground-basis", choices=("image", "batch"), default="image",
                   help="first component of each image's own PCA (default) or of one PCA over all images "
                        "(DINOv2's joint fit; the PCA colours always use one basis per model)")
    _connection(p)
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if args.out.suffix.lower() != ".png":
        print(f"vitserve viz: --out must name a .png file, got {args.out}", file=sys.stderr)
        return 2
    if not 0.0 <= args.threshold <= 1.0:
        print(f"vitserve viz: --threshold must be in [0, 1], got {args.threshold}", file=sys.stderr)
        return 2
    models = [m.strip() for m in args.model.split(",")] if args.model else [""]
    if any(not m for m in models) and len(models) > 1:
        print(f"vitserve viz: --model lists an empty name: {args.model!r}", file=sys.stderr)
        return 2
    try:
        data = [path.read_bytes() for path in args.images]
    except OSError as e:
        print(f"vitserve viz: cannot read {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    code, views = _with_client(p.prog, args, lambda client: [
        fetch_views(client, data, m, args.foreground, args.threshold, args.foreground_basis == "image")
        for m in models])
    if code:
        return code
    try:
        write_views_png(args.out, data, [path.name for path in args.images], views)
    except OSError as e:  # an image the server decoded but pillow cannot, or an unwritable --out
        print(f"vitserve viz: cannot write {args.out}: {e}", file=sys.stderr)
        return 2
    for mv in views:
        has = "with" if mv.views.attention is not None else "without"
        print(f"{mv.model}: grid {mv.grid[0]}x{mv.grid[1]}, PCA explains "
              f"{100 * float(mv.views.basis.explained.sum()):.1f}% of the variance, {has} cls_attention")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
