"""Where the icons dataset's drawings come from: open icon sets, each by its own designers.

A *set* is one designer team's drawings with the names (and, where the package has them, the
tags) its authors wrote.  Two kinds install by name, offline from a package registry:

- npm packages of monochrome glyph sets (Tabler, Lucide, Bootstrap, Phosphor, Remix, Material
  Design Icons, Font Awesome Free, Ionicons, Iconoir, Feather, Octicons): one SVG per name, in
  the set's regular style only (an outline and a filled drawing of one name are one designer's
  one idea, not two designers');
- Debian icon themes (Papirus, Breeze, Adwaita, Oxygen, Tango, elementary, Numix): colour
  drawings under the freedesktop icon naming specification, so one name means one thing across
  themes.

Emoji sets and emoji fonts are never read here: they are kept for evaluation outside the repo.
``openclipart-png`` is not read either: the shipped backbone was pretrained on it, and a
dataset that measures transfer must not hold the pretraining images.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Drawing:
    """One designer's drawing of one named thing."""

    set_name: str       # which set drew it (a designer team)
    name: str           # the set's own name for it, normalised to lower-case-with-hyphens
    tags: tuple         # the set's own keywords for it (may be empty)
    path: str           # the SVG or PNG file


@dataclass(frozen=True)
class IconSet:
    name: str
    kind: str           # "npm" or "debian"
    package: str        # what to install, by name
    version: str        # the npm version pinned (a Debian theme takes the release's version)
    licence: str
    read: object        # (package folder) -> list[Drawing]


# --------------------------------------------------------------------------------------------
# Glyph sets (npm): one reader per package layout
# --------------------------------------------------------------------------------------------
def _norm(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().lower())


def _svgs(folder: Path, suffix: str = ".svg") -> dict[str, Path]:
    """name -> file for the files of ``folder`` ending in ``suffix`` (the suffix removed)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: missing (is the package installed whole?)")
    return {f.name[:-len(suffix)]: f for f in sorted(folder.iterdir()) if f.name.endswith(suffix)}


def _words(tag) -> str:
    return " ".join(re.split(r"[\s_-]+", str(tag).strip().lower())).strip()


def _drawings(set_name: str, files: dict[str, Path], tags: dict[str, list]) -> list[Drawing]:
    return [Drawing(set_name, _norm(n), tuple(dict.fromkeys(w for w in map(_words, tags.get(n, []))
                                                              if w)),
                    str(p)) for n, p in sorted(files.items())]


def _read_tabler(root: Path) -> list[Drawing]:
    meta = json.loads((root / "icons.json").read_text())
    return _drawings("tabler", _svgs(root / "icons" / "outline"),
                     {n: m.get("tags", []) for n, m in meta.items()})


def _read_lucide(root: Path) -> list[Drawing]:
    return _drawings("lucide", _svgs(root / "icons"), json.loads((root / "tags.json").read_text()))


def _read_bootstrap(root: Path) -> list[Drawing]:
    files = {n: p for n, p in _svgs(root / "icons").items() if not n.endswith("-fill")}
    return _drawings("bootstrap", files, {})


def _read_phosphor(root: Path) -> list[Drawing]:
    """Tags live in the package's JavaScript catalogue: ``name: "x", ... tags: [...]``."""
    text = (root / "dist" / "index.mjs").read_text()
    tags = {m.group(1): re.findall(r'"([^"]*)"', m.group(2)) for m in
            re.finditer(r'name: "([^"]+)",[^{}]*?tags: \[([^\]]*)\]', text)}
    return _drawings("phosphor", _svgs(root / "assets" / "regular"), tags)


def _read_remix(root: Path) -> list[Drawing]:
    files, tags = {}, {}
    for category in sorted(p for p in (root / "icons").iterdir() if p.is_dir()):
        for n, p in _svgs(category, "-line.svg").items():
            files[n], tags[n] = p, [category.name.split(" & ")[0]]
    return _drawings("remix", files, tags)


def _read_mdi(root: Path) -> list[Drawing]:
    """The base (filled) drawing of each name; outline variants are the same design."""
    meta = [m for m in json.loads((root / "meta.json").read_text()) if not m.get("deprecated")]
    tags = {m["name"]: list(m.get("aliases", [])) + list(m.get("tags", [])) for m in meta}
    files = {n: p for n, p in _svgs(root / "svg").items()
             if n in tags and not n.endswith("-outline")}
    return _drawings("mdi", files, tags)


def _read_fontawesome(root: Path) -> list[Drawing]:
    import yaml  # a dependency of `datasets`

    meta = yaml.safe_load((root / "metadata" / "icons.yml").read_text())
    tags = {n: [m.get("label", "")] + list((m.get("search") or {}).get("terms") or [])
            for n, m in meta.items()}
    return _drawings("fontawesome", _svgs(root / "svgs" / "solid"), tags)


def _read_ionicons(root: Path) -> list[Drawing]:
    meta = json.loads((root / "dist" / "ionicons.json").read_text())["icons"]
    tags = {m["name"]: [t for t in m.get("tags", []) if t != "outline"] for m in meta}
    files = _svgs(root / "dist" / "svg", "-outline.svg")
    return _drawings("ionicons", files, {n: tags.get(n + "-outline", []) for n in files})


def _read_iconoir(root: Path) -> list[Drawing]:
    return _drawings("iconoir", _svgs(root / "icons" / "regular"), {})


def _read_feather(root: Path) -> list[Drawing]:
    return _drawings("feather", _svgs(root / "dist" / "icons"), {})


def _read_octicons(root: Path) -> list[Drawing]:
    meta = json.loads((root / "build" / "data.json").read_text())
    return _drawings("octicons", _svgs(root / "build" / "svg", "-24.svg"),
                     {n: m.get("keywords", []) for n, m in meta.items()})


# --------------------------------------------------------------------------------------------
# Icon themes (Debian): the freedesktop layout, any of its size-folder conventions
# --------------------------------------------------------------------------------------------
# Contexts of the naming specification kept: things and actions.  Left out: mimetypes (a page
# with a small badge, told apart by the badge alone), animations, intl and cursors.
THEME_CONTEXTS = ("actions", "apps", "categories", "devices", "emblems", "emotes", "places",
                  "status")
_SIZE = re.compile(r"^(\d+)(?:x\d+)?(?:@(\d)x)?$")


def _theme_size(parts: tuple) -> int | None:
    """The pixel size a theme folder path names (``48x48``, ``48``, ``24@2x``, ``scalable``)."""
    for part in parts:
        if part == "scalable":
            return 10_000
        m = _SIZE.match(part)
        if m:
            return int(m.group(1)) * int(m.group(2) or 1)
    return None


def read_theme(set_name: str, folder: Path) -> list[Drawing]:
    """Each name's drawing at the size nearest 64 px from above (a theme redraws small sizes
    with less detail); symbolic (monochrome) variants and alias symlinks are skipped, so each
    drawing counts once, under the name its designers gave the file."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: missing (is the theme installed?)")
    best: dict[str, tuple] = {}
    for dirpath, _, names in os.walk(folder):
        rel = Path(dirpath).relative_to(folder).parts
        context = next((p for p in rel if p in THEME_CONTEXTS), None)
        size = _theme_size(rel)
        if context is None or size is None or "symbolic" in rel:
            continue
        for f in names:
            stem, ext = os.path.splitext(f)
            path = Path(dirpath) / f
            if ext not in (".svg", ".png") or stem.endswith("-symbolic") or path.is_symlink():
                continue
            rank = (size < 64, abs(size - 64), ext != ".svg", str(path))
            if stem not in best or rank < best[stem][0]:
                best[stem] = (rank, path, context)
    return [Drawing(set_name, _norm(n), (context,), str(p))
            for n, (_, p, context) in sorted(best.items())]


def _theme_reader(set_name: str, subfolder: str):
    def read(root: Path) -> list[Drawing]:
        return read_theme(set_name, root / subfolder)
    return read


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------
ICON_SETS = {s.name: s for s in [
    IconSet("tabler", "npm", "@tabler/icons", "3.52.0", "MIT", _read_tabler),
    IconSet("lucide", "npm", "lucide-static", "1.62.0", "ISC", _read_lucide),
    IconSet("bootstrap", "npm", "bootstrap-icons", "1.13.2", "MIT", _read_bootstrap),
    IconSet("phosphor", "npm", "@phosphor-icons/core", "2.1.1", "MIT", _read_phosphor),
    IconSet("remix", "npm", "remixicon", "4.9.1", "Apache-2.0", _read_remix),
    IconSet("mdi", "npm", "@mdi/svg", "7.4.47", "Apache-2.0", _read_mdi),
    IconSet("fontawesome", "npm", "@fortawesome/fontawesome-free", "7.3.1", "CC-BY-4.0",
            _read_fontawesome),
    IconSet("ionicons", "npm", "ionicons", "8.1.0", "MIT", _read_ionicons),
    IconSet("iconoir", "npm", "iconoir", "7.12.1", "MIT", _read_iconoir),
    IconSet("feather", "npm", "feather-icons", "4.29.2", "MIT", _read_feather),
    IconSet("octicons", "npm", "@primer/octicons", "19.42.0", "MIT", _read_octicons),
    *(IconSet(name, "debian", package, "", licence, _theme_reader(name, folder))
      for name, package, licence, folder in (
          ("papirus", "papirus-icon-theme", "GPL-3.0", "Papirus"),
          ("breeze", "breeze-icon-theme", "LGPL-3.0", "breeze"),
          ("adwaita", "adwaita-icon-theme", "LGPL-3.0 or CC-BY-SA-3.0", "Adwaita"),
          ("oxygen", "oxygen-icon-theme", "LGPL-3.0", "oxygen/base"),
          ("tango", "tango-icon-theme", "public domain", "Tango"),
          ("elementary", "elementary-icon-theme", "GPL-3.0", "elementary"),
          ("numix", "numix-icon-theme", "GPL-3.0", "Numix"))),
]}

# The sets whose licences ask no more than attribution: the project's figures of real drawings
# (docs/icons_concepts.png) show only these, credited.
FIGURE_LICENCES = ("MIT", "ISC", "Apache-2.0", "CC-BY-4.0", "public domain")

# The renderer of the SVG files: librsvg, the library the desktops render these themes with.
RENDERER_PACKAGE = "librsvg2-bin"


def install_commands(npm_prefix: str = "data/.icon-packages") -> list[list[str]]:
    """The commands that install every set and the renderer: npm into ``npm_prefix``, Debian's
    packages system-wide (through sudo unless root)."""
    npm = [f"{s.package}@{s.version}" for s in ICON_SETS.values() if s.kind == "npm"]
    deb = [s.package for s in ICON_SETS.values() if s.kind == "debian"] + [RENDERER_PACKAGE]
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    return [["npm", "install", "--prefix", npm_prefix, "--no-audit", "--no-fund", *npm],
            [*sudo, "apt-get", "install", "-y", "--no-install-recommends", *deb]]


def install(npm_prefix: str = "data/.icon-packages") -> None:
    """Install what :func:`install_commands` names, skipping what is installed already."""
    npm_cmd, apt_cmd = install_commands(npm_prefix)
    root = Path(npm_prefix) / "node_modules"
    if any(installed_version(s, root) != s.version for s in ICON_SETS.values()
           if s.kind == "npm"):
        subprocess.run(npm_cmd, check=True)
    if any(installed_version(s, root) == "unknown" for s in ICON_SETS.values()
           if s.kind == "debian") or shutil.which("rsvg-convert") is None:
        subprocess.run(apt_cmd, check=True)


def package_folder(icon_set: IconSet, npm_root: Path, theme_root: Path) -> Path:
    return npm_root / icon_set.package if icon_set.kind == "npm" else theme_root


def installed_version(icon_set: IconSet, npm_root: Path) -> str:
    """The version on disk: package.json for npm, dpkg for Debian; "unknown" when missing."""
    if icon_set.kind == "npm":
        try:
            return json.loads((npm_root / icon_set.package / "package.json").read_text())["version"]
        except (OSError, ValueError, KeyError):
            return "unknown"
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status} ${Version}",
                              icon_set.package], capture_output=True, text=True, check=False)
    except OSError:
        return "unknown"
    status, _, version = out.stdout.strip().partition(" ")
    return version if status == "installed" and version else "unknown"


if __name__ == "__main__":  # `python -m mixer_lite.icon_sources` installs the sets
    install()
