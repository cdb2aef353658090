"""Draw the demo dataset's scenes on the GPU, batch at a time, from the scenes and `spec.json`
that `parallax dataset` writes. The same rules as src/scenes/render.rs: 2x2 samples a pixel (at a
quarter and three quarters), the background's colour there, the objects painted over it in order.
"""

import json
import lzma
import math

import numpy as np
import torch

from models import tokenize

SHAPES = ["circle", "square", "triangle", "star", "ring", "cross", "heart"]
KINDS = ["plain", "sky", "sea", "stripes", "checkerboard", "night", "polka"]
MAX_OBJECTS = 3


def load(path, spec_path):
    """Training lines (`[caption, kind, [colours], [[shape, colour, x, y, r], ...]]`) as arrays: kind (N,), bg colours (N, 2, 3), objects (N, 3, 7) = shape id (-1 none),
    r, g, b, x, y, half-size; and the captions' token ids."""
    spec = json.load(open(spec_path))
    pal = {k: v for k, v in spec["palette"].items()}
    opener = lzma.open if str(path).endswith(".xz") else open
    kinds, bgs, objs, t5s, clips, caps = [], [], [], [], [], []
    with opener(path, "rt") as f:
        for line in f:
            caption, kind, colours, objects = json.loads(line)
            kinds.append(KINDS.index(kind))
            cols = [pal[c] for c in colours] + [[128, 128, 128]] * 2
            bgs.append(cols[:2])
            o = np.full((MAX_OBJECTS, 7), -1.0, dtype=np.float32)
            for i, (shape, colour, x, y, r) in enumerate(objects[:MAX_OBJECTS]):
                o[i] = [SHAPES.index(shape), *pal[colour], x, y, r]
            objs.append(o)
            t5, clip = tokenize(caption)
            t5s.append(t5)
            clips.append(clip)
            caps.append(caption)
    return dict(
        spec=spec,
        kind=torch.tensor(kinds),
        bg=torch.tensor(np.array(bgs, dtype=np.float32)),
        obj=torch.tensor(np.stack(objs)),
        t5=torch.tensor(t5s, dtype=torch.long),
        clip=torch.tensor(clips, dtype=torch.long),
        captions=caps,
    )


def shape_mask(shape, u, v):
    """Inside test for each shape id (B, 1, 1) at frame coordinates u, v (B, S, S)."""
    r = torch.sqrt(u * u + v * v)
    s3 = 0.8660254
    sector = 2 * math.pi / 5
    phi = torch.remainder(torch.atan2(u, -v), sector)
    local = (phi - sector / 2).abs() / (sector / 2)
    x = u * 1.15
    y = -v * 1.15 + 0.1
    q = x * x + y * y - 1.0
    masks = [
        r <= 1.0,
        torch.maximum(u.abs(), v.abs()) <= 0.85,
        (v <= 0.5) & ((-s3 * u - 0.5 * v) <= 0.5) & ((s3 * u - 0.5 * v) <= 0.5),
        (r <= 1.0) & (r <= 0.42 + 0.58 * local * local),
        (r >= 0.5) & (r <= 1.0),
        ((u.abs() <= 1.0) & (v.abs() <= 0.33)) | ((u.abs() <= 0.33) & (v.abs() <= 1.0)),
        (q * q * q - x * x * y * y * y) <= 0.0,
    ]
    out = torch.zeros_like(u, dtype=torch.bool)
    for i, m in enumerate(masks):
        out |= m & (shape == i)
    return out & (u.abs() <= 1.2) & (v.abs() <= 1.2)


class Renderer:
    def __init__(self, spec, size, device):
        self.size = size
        self.device = device
        n = 2 * size
        g = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n
        self.y, self.x = torch.meshgrid(g, g, indexing="ij")
        t = lambda k: torch.tensor(spec[k], dtype=torch.float32, device=device)
        self.spec = spec
        self.sea_sky_top, self.sea_sky_horizon = t("sea_sky_top"), t("sea_sky_horizon")
        self.sea_near, self.sea_far = t("sea_near"), t("sea_far")
        self.night, self.night_dot = t("night"), t("night_dot")
        dots = torch.tensor(spec["night_dots"], dtype=torch.float32, device=device)
        d2 = (self.x[..., None] - dots[:, 0]) ** 2 + (self.y[..., None] - dots[:, 1]) ** 2
        self.dot_mask = (d2 <= spec["night_dot_radius"] ** 2).any(-1)
        # polka dots (a background only the demo LoRA's scenes use; older spec.json files lack it)
        cells, rad = spec.get("polka_cells", 5.0), spec.get("polka_radius", 0.0)
        cx = (torch.floor(self.x * cells) + 0.5) / cells
        cy = (torch.floor(self.y * cells) + 0.5) / cells
        self.polka_mask = (self.x - cx) ** 2 + (self.y - cy) ** 2 <= rad ** 2

    def render(self, kind, bg, obj):
        """(B, 3, S, S) images in [-1, 1] for kind (B,), bg (B, 2, 3), obj (B, 3, 7)."""
        dev = self.device
        kind, bg, obj = kind.to(dev), bg.to(dev), obj.to(dev)
        B = kind.shape[0]
        x, y = self.x[None], self.y[None]
        c1 = bg[:, 0][:, :, None, None]
        c2 = bg[:, 1][:, :, None, None]
        k = kind[:, None, None, None]
        spec = self.spec
        # sky: colour at the top to its pale version (rounded, as the Rust side does) at the bottom
        pale = torch.round(c1 + (255.0 - c1) * spec["sky_pale"])
        yy = y[:, None]
        xx = x[:, None]
        sky = c1 + (pale - c1) * yy
        h = spec["horizon"]
        up = self.sea_sky_top[None, :, None, None] + (self.sea_sky_horizon - self.sea_sky_top)[None, :, None, None] * (yy / h)
        down = self.sea_near[None, :, None, None] + (self.sea_far - self.sea_near)[None, :, None, None] * ((yy - h) / (1 - h))
        sea = torch.where(yy < h, up, down)
        band = torch.floor(xx * spec["bands"])
        stripes = torch.where(torch.remainder(band, 2) == 0, c1, c2)
        cell = band + torch.floor(yy * spec["bands"])
        checker = torch.where(torch.remainder(cell, 2) == 0, c1, c2)
        night = torch.where(self.dot_mask[None, None], self.night_dot[None, :, None, None], self.night[None, :, None, None])
        img = torch.where(k == 0, c1.expand(-1, -1, *x.shape[1:]), 0.0)
        img = torch.where(k == 1, sky, img)
        img = torch.where(k == 2, sea.expand(B, -1, -1, -1), img)
        img = torch.where(k == 3, stripes, img)
        img = torch.where(k == 4, checker, img)
        img = torch.where(k == 5, night.expand(B, -1, -1, -1), img)
        img = torch.where(k == 6, torch.where(self.polka_mask[None, None], c2, c1), img)
        for i in range(obj.shape[1]):
            o = obj[:, i]
            present = o[:, 0] >= 0
            shape = o[:, 0].long()[:, None, None]
            r = o[:, 6].clamp(min=1e-3)[:, None, None]
            u = (x - o[:, 4][:, None, None]) / r
            v = (y - o[:, 5][:, None, None]) / r
            m = shape_mask(shape, u, v) & present[:, None, None]
            img = torch.where(m[:, None], o[:, 1:4][:, :, None, None], img)
        img = torch.nn.functional.avg_pool2d(img, 2)
        return torch.round(img).clamp(0, 255) / 127.5 - 1.0
