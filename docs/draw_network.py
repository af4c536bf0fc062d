"""Draw the ProtoAD network figure of the user guide with PIL.

Run by ``docs/conf.py`` at every build (and runnable by hand)::

    python docs/draw_network.py docs/_generated/protoad_network.png

No graphviz or matplotlib needed: boxes, arrows and text drawn with PIL.
"""

import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SCALE = 2  # draw at twice the display size for sharp text
W, H = 1180, 470
INK = (40, 40, 40)
FILL = {
    "data": (232, 240, 252),
    "backbone": (255, 240, 214),
    "head": (226, 245, 228),
    "fit": (243, 233, 250),
    "out": (252, 228, 228),
}


def font(size):
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size * SCALE)
        except OSError:
            pass
    return ImageFont.load_default(size=size * SCALE)


def s(*values):
    return [v * SCALE for v in values]


def box(draw, x, y, w, h, title, lines=(), kind="head", dashed=False):
    draw.rounded_rectangle(s(x, y, x + w, y + h), radius=8 * SCALE, fill=FILL[kind],
                           outline=INK, width=(1 if dashed else 2) * SCALE)
    draw.text(s(x + w / 2, y + 16), title, fill=INK, font=font(14), anchor="mm")
    for i, line in enumerate(lines):
        draw.text(s(x + w / 2, y + 38 + 17 * i), line, fill=(70, 70, 70), font=font(12),
                  anchor="mm")
    return (x, y, w, h)


def arrow(draw, x0, y0, x1, y1, dashed=False, label=None):
    if dashed:
        n = max(1, int(((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5 // 10))
        for i in range(0, n, 2):
            a, b = i / n, min(1.0, (i + 1) / n)
            draw.line(s(x0 + a * (x1 - x0), y0 + a * (y1 - y0),
                        x0 + b * (x1 - x0), y0 + b * (y1 - y0)), fill=INK, width=2 * SCALE)
    else:
        draw.line(s(x0, y0, x1, y1), fill=INK, width=2 * SCALE)
    dx, dy = x1 - x0, y1 - y0
    norm = max((dx * dx + dy * dy) ** 0.5, 1e-9)
    ux, uy = dx / norm, dy / norm
    head = [(x1, y1), (x1 - 10 * ux + 5 * uy, y1 - 10 * uy - 5 * ux),
            (x1 - 10 * ux - 5 * uy, y1 - 10 * uy + 5 * ux)]
    draw.polygon([(px * SCALE, py * SCALE) for px, py in head], fill=INK)
    if label:
        draw.text(s((x0 + x1) / 2, (y0 + y1) / 2 - 10), label, fill=INK, font=font(11),
                  anchor="mb")


def right(b):
    return b[0] + b[2], b[1] + b[3] / 2


def left(b):
    return b[0], b[1] + b[3] / 2


def draw_figure(path):
    img = Image.new("RGB", s(W, H), "white")
    d = ImageDraw.Draw(img)
    d.text(s(W / 2, 20), "ProtoAD: one network, no training (inference path, top; fit, bottom)",
           fill=INK, font=font(15), anchor="mm")

    # top row: inference
    y, h = 50, 110
    b_img = box(d, 10, y, 130, h, "image", ["resize 256,", "centre crop 224", "RGB in [0, 1]"],
                "data")
    b_bb = box(d, 170, y, 175, h, "frozen CNN", ["stages = layers", "e.g. strides 4, 8, 16",
                                                  "ImageNet weights"], "backbone")
    b_join = box(d, 375, y, 170, h, "join + L2 norm", ["coarse stages up to", "finest stride;",
                                                         "concat, unit norm"], "backbone")
    b_conv = box(d, 575, y, 180, h, "1x1 conv", ["kernels = K unit", "prototypes:",
                                                  "K cosine maps"], "head")
    b_max = box(d, 785, y, 160, h, "1 - max cosine", ["max over the K", "channels, per", "patch"],
                "head")
    b_up = box(d, 975, y, 195, h, "upsample + smooth", ["bilinear to the crop,", "Gaussian sigma 4",
                                                         "(alignment: center/paper)"], "head")
    for a, b in ((b_img, b_bb), (b_bb, b_join), (b_join, b_conv), (b_conv, b_max), (b_max, b_up)):
        arrow(d, *right(a), *left(b))

    # outputs
    y2 = 210
    b_map = box(d, 975, y2, 195, 80, "anomaly map", ["anomaly_maps(X)", "predict_masks(X)"], "out")
    b_score = box(d, 700, y2, 250, 80, "image score = max of map",
                  ["score_samples(X) = -score", "predict(X): +1 / -1 by threshold"], "out")
    arrow(d, 1072, y + h, 1072, y2)
    arrow(d, 975, y2 + 40, 950, y2 + 40)

    # bottom row: fit
    y3 = 340
    b_train = box(d, 10, y3, 150, h, "normal images", ["fit(X) or fit(X, y)", "with y == 1",
                                                        "(defect-free)"], "data")
    b_feat = box(d, 190, y3, 190, h, "patch features", ["same backbone + join:", "N images x h x w",
                                                         "unit vectors"], "backbone")
    b_clu = box(d, 410, y3, 200, h, "clustering", ["FINCH (default)", "or k-means;",
                                                    "K = n_clusters"], "fit")
    b_proto = box(d, 640, y3, 180, h, "prototypes", ["unit cluster means", "(K x C)",
                                                      "-> conv kernels"], "fit")
    b_thr = box(d, 850, y3, 320, h, "threshold (offset_)", ["contamination='auto': 99 % order",
                                                             "statistic of held-out folds' scores",
                                                             "(unseen); float: sklearn meaning"],
                "fit")
    for a, b in ((b_train, b_feat), (b_feat, b_clu), (b_clu, b_proto), (b_proto, b_thr)):
        arrow(d, *right(a), *left(b))
    # prototypes become the conv kernels
    arrow(d, 665, y3, 640, y + h, dashed=True)
    d.text(s(638, 250), "prototypes = kernels", fill=INK, font=font(11), anchor="rm")
    # threshold used by predict
    arrow(d, 900, y3, 870, y2 + 80, dashed=True)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)
    return path


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "protoad_network.png"
    print(draw_figure(out))
