"""Small icon packages laid out as the real ones are (npm glyph sets and a Debian theme, each
drawing the same few shapes in its own style), shared by the icons dataset's and the
pretraining's tests."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from mixer_lite.icons import rasterise

SHAPES = {  # concept name -> the SVG body each set draws in its own style
    "circle": '<circle cx="12" cy="12" r="8"/>',
    "square": '<rect x="4" y="4" width="16" height="16"/>',
    "triangle": '<path d="M12 3 L21 20 L3 20 Z"/>',
    "plus": '<path d="M12 3 V21 M3 12 H21"/>',
    "minus": '<path d="M3 12 H21"/>',
    "arrow-up": '<path d="M12 21 V3 M5 10 L12 3 L19 10"/>',
    "arrow-down": '<path d="M12 3 V21 M5 14 L12 21 L19 14"/>',
    "heart": '<path d="M12 20 L4 11 A4 4 0 0 1 12 6 A4 4 0 0 1 20 11 Z"/>',
    "star": '<path d="M12 2 L15 9 L22 9 L16 14 L18 21 L12 17 L6 21 L8 14 L2 9 L9 9 Z"/>',
    "bolt": '<path d="M13 2 L4 14 H11 L10 22 L20 9 H13 Z"/>',
}
STYLES = {"tabler": 'fill="none" stroke="#000" stroke-width="2"',
          "lucide": 'fill="none" stroke="#000" stroke-width="1.5"',
          "bootstrap": 'fill="#000" stroke="#000" stroke-width="1"',
          "iconoir": 'fill="none" stroke="#222" stroke-width="2.5"'}
SETS = ("tabler", "lucide", "bootstrap", "iconoir", "tango")


def svg(body: str, style: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="24" height="24" viewBox="0 0 24 24">'
            f'<g {style}>{body}</g></svg>')


def make_packages(root: Path, shapes=SHAPES, identical_in_bootstrap=()) -> tuple[Path, Path]:
    """npm packages and a Debian theme in their real layouts, each set drawing ``shapes``."""
    npm, themes = root / "node_modules", root / "icons"
    folders = {"tabler": npm / "@tabler/icons/icons/outline", "lucide": npm / "lucide-static/icons",
               "bootstrap": npm / "bootstrap-icons/icons",
               "iconoir": npm / "iconoir/icons/regular"}
    for s, folder in folders.items():
        folder.mkdir(parents=True)
        for name, body in shapes.items():
            style = STYLES["lucide" if name in identical_in_bootstrap and s == "bootstrap"
                           else s]
            (folder / f"{name}.svg").write_text(svg(body, style))
    (folders["bootstrap"] / "circle-fill.svg").write_text(svg(SHAPES["circle"], 'fill="#000"'))
    (npm / "@tabler/icons/icons.json").write_text(json.dumps(
        {n: {"name": n, "tags": ["shape", f"tabler {n} tag"]} for n in shapes}))
    (npm / "lucide-static/tags.json").write_text(json.dumps({n: ["lucide tag"] for n in shapes}))
    for context in ("actions", "emblems"):
        (themes / "Tango" / "64x64" / context).mkdir(parents=True, exist_ok=True)
    for i, (name, body) in enumerate(shapes.items()):
        img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
        colour = f"#{40 * (i % 5):02x}6{i}c0"
        drawn = rasterise_text(svg(body, f'fill="{colour}" stroke="{colour}" stroke-width="3"'),
                               root / "tmp.svg")
        img.alpha_composite(drawn.resize((64, 64)))
        img.save(themes / "Tango" / "64x64" / ("actions" if i % 2 else "emblems") / f"{name}.png")
    return npm, themes


def rasterise_text(text: str, path: Path) -> Image.Image:
    path.write_text(text)
    return rasterise(str(path))
