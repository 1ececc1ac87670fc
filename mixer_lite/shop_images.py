"""Shop views of an object: the seller's clean studio shot (a doc image) and the user's photo
(a query image), with every degradation of the domain gap scaled by one knob, ``gap``.

Shared by SynthShop (its products) and by pretraining (objects cut out of real drawings), so the
pretrained encoder learns across the same gap the retrieval model meets.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CANVAS = 128  # objects are drawn at 128 px and downsampled, for anti-aliasing


def studio_shot(obj: Image.Image, rng: np.random.Generator, size: int) -> tuple[Image.Image, list]:
    """A seller's clean shot: light plain background, object centred, small framing changes.

    Also returns where the object went, ``[x, y, side]`` on the 128 px canvas, for its mask
    (:func:`object_labels`)."""
    bg = int(rng.integers(235, 256))
    canvas = Image.new("RGB", (CANVAS, CANVAS), (bg, bg, bg - int(rng.integers(0, 6))))
    scale = rng.uniform(0.82, 0.98)
    s = int(CANVAS * scale)
    o = obj.resize((s, s), Image.BILINEAR)
    off = (CANVAS - s) // 2
    dx, dy = rng.integers(-4, 5, size=2)
    box = [off + int(dx), off + int(dy), s]
    canvas.paste(o, tuple(box[:2]), o)
    arr = np.asarray(canvas, dtype=np.float32) * rng.uniform(0.96, 1.04)
    canvas = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return canvas.resize((size, size), Image.BOX), box


def scene_shot(objs: list[Image.Image], rng: np.random.Generator, size: int,
               max_overlap: float = 0.2) -> tuple[Image.Image, list, Image.Image]:
    """A seller's styled shot of several objects (a model wearing a hat with a bag, a bundle, a
    shelf): the same light studio as :func:`studio_shot`, each object at its own size (36-62%
    of the side) and place, so neither the largest nor the most central object is the one
    sold: only the title tells.  Boxes are drawn until no two overlap by more than
    ``max_overlap`` of the smaller one (the best of 50 tries otherwise); objects are pasted in a
    random order, so one may hide a little of another.

    Returns the image, each object's ``[x, y, side]`` on the 128 px canvas (in ``objs``'
    order) and the order they were pasted in (for :func:`object_labels`).
    """
    bg = int(rng.integers(235, 256))
    canvas = Image.new("RGB", (CANVAS, CANVAS), (bg, bg, bg - int(rng.integers(0, 6))))
    sides = (CANVAS * rng.uniform(0.36, 0.62, size=len(objs))).astype(int)
    best, best_overlap = None, np.inf
    for _ in range(50):
        corners = [rng.integers(0, CANVAS - s + 1, size=2) for s in sides]
        overlap = max((_box_overlap(corners[i], sides[i], corners[j], sides[j])
                       for i in range(len(objs)) for j in range(i)), default=0.0)
        if overlap < best_overlap:
            best, best_overlap = corners, overlap
        if overlap <= max_overlap:
            break
    boxes = [[int(c[0]), int(c[1]), int(s)] for c, s in zip(best, sides)]
    order = [int(i) for i in rng.permutation(len(objs))]
    for i in order:
        x, y, s = boxes[i]
        o = objs[i].resize((s, s), Image.BILINEAR)
        canvas.paste(o, (x, y), o)
    arr = np.asarray(canvas, dtype=np.float32) * rng.uniform(0.96, 1.04)
    canvas = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return canvas.resize((size, size), Image.BOX), boxes, order


def object_labels(objs: list[Image.Image], boxes: list, order: list[int]) -> Image.Image:
    """Where each object of a shot is seen: a 128 px label map (mode ``L``), ``i + 1`` on the
    pixels object ``i`` touches at all (its anti-aliased rim included) and no object pasted
    after it touches, 0 on the plain background.  ``boxes`` and ``order`` are what :func:`studio_shot` or
    :func:`scene_shot` returned."""
    labels = Image.new("L", (CANVAS, CANVAS), 0)
    for i in order:
        x, y, s = boxes[i]
        alpha = objs[i].getchannel("A").resize((s, s), Image.BILINEAR)
        labels.paste(i + 1, (x, y), alpha.point(lambda a: 255 if a else 0))
    return labels


def _box_overlap(a, sa: int, b, sb: int) -> float:
    """The overlap of two squares as a share of the smaller one's area."""
    w = min(a[0] + sa, b[0] + sb) - max(a[0], b[0])
    h = min(a[1] + sa, b[1] + sb) - max(a[1], b[1])
    return max(0, w) * max(0, h) / min(sa, sb) ** 2


def _cluttered_background(rng: np.random.Generator) -> Image.Image:
    c0, c1 = rng.integers(0, 256, size=(2, 3))
    t = np.linspace(0, 1, CANVAS, dtype=np.float32)[:, None, None]
    grad = (c0 * (1 - t) + c1 * t) * np.ones((1, CANVAS, 1), dtype=np.float32)
    bg = Image.fromarray(grad.astype(np.uint8))
    d = ImageDraw.Draw(bg)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.integers(-20, CANVAS, size=2)
        w, h = rng.integers(10, 60, size=2)
        fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            d.rectangle((int(x0), int(y0), int(x0 + w), int(y0 + h)), fill=fill)
        else:
            d.ellipse((int(x0), int(y0), int(x0 + w), int(y0 + h)), fill=fill)
    return bg


def user_photo(obj: Image.Image, rng: np.random.Generator, size: int, gap: float) -> Image.Image:
    """A user's photo of the product: every degradation scales with ``gap``."""
    canvas = _cluttered_background(rng) if rng.random() < min(1.0, gap) else \
        Image.new("RGB", (CANVAS, CANVAS), (240, 240, 240))
    scale = 1.0 - gap * rng.uniform(0.0, 0.45)
    s = max(16, int(CANVAS * scale))
    o = obj.rotate(float(gap * rng.uniform(-35, 35)), resample=Image.BILINEAR, expand=False)
    o = o.resize((s, s), Image.BILINEAR)
    shift = int(gap * 0.25 * CANVAS)
    x = (CANVAS - s) // 2 + int(rng.integers(-shift, shift + 1))
    y = (CANVAS - s) // 2 + int(rng.integers(-shift, shift + 1))
    canvas.paste(o, (x, y), o)
    # Perspective: move the four corners by up to 12% of the side.
    k = gap * 0.12 * CANVAS
    src = np.array([[0, 0], [CANVAS, 0], [CANVAS, CANVAS], [0, CANVAS]], dtype=np.float64)
    dst = src + rng.uniform(-k, k, size=(4, 2))
    canvas = canvas.transform((CANVAS, CANVAS), Image.PERSPECTIVE,
                              perspective_coeffs(src, dst), Image.BILINEAR)
    if rng.random() < 0.5 * min(1.0, gap):  # partial occlusion: a thumb, a bag strap, a cup...
        d = ImageDraw.Draw(canvas)
        w, h = (rng.uniform(0.15, 0.35, size=2) * CANVAS).astype(int)
        x0, y0 = rng.integers(0, CANVAS - 10, size=2)
        d.ellipse((int(x0), int(y0), int(x0 + w), int(y0 + h)),
                  fill=tuple(int(v) for v in rng.integers(0, 256, size=3)))
    canvas = canvas.resize((size, size), Image.BOX)
    blur = gap * rng.uniform(0.0, 1.2)
    if blur > 0.2:
        canvas = canvas.filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(canvas, dtype=np.float32)
    cast = 1.0 + gap * rng.uniform(-0.25, 0.25, size=3)       # white balance
    arr = arr * cast * (1.0 + gap * rng.uniform(-0.3, 0.2))    # exposure
    arr = arr + rng.normal(0.0, gap * rng.uniform(0, 10), size=arr.shape)  # sensor noise
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img


def perspective_coeffs(src: np.ndarray, dst: np.ndarray) -> list[float]:
    """Coefficients PIL wants: they map output (src) corners to input (dst) corners."""
    a = []
    for (x, y), (u, v) in zip(src, dst):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    return np.linalg.solve(np.array(a), dst.reshape(-1)).tolist()


def encode_image(img: Image.Image, fmt: str, rng: np.random.Generator, gap: float) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=int(95 - gap * rng.uniform(10, 60)))
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()
