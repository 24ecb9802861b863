"""Architecture diagram of the AnySat encoder.

Draws, left to right: a tile seen by any subset of the 11 sensors, the per-modality projectors
(VHR conv + MLP for images, L-TAE for time series), the shared spatial encoder (iRPE transformer
over the sub-patches of each patch), the combiner (self-attention over all modalities' patch
tokens, then cross-attention from learned tile / patch queries) and the three outputs
(tile, patch, dense). A note at the bottom recalls the JEPA + contrastive pretraining.

Regenerate ``docs/figures/architecture.png`` with::

  python docs/figures/architecture.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

OUT = Path(__file__).with_name("architecture.png")
WIDTH, HEIGHT = 16.0, 7.0  # figure size in inches; 100 dpi -> 1600 x 700 px
COLORS = {
  "input": "#dbe9f6",
  "proj": "#fde2c8",
  "enc": "#d9f0d3",
  "comb": "#e8dcf0",
  "out": "#fbd5d5",
}
EDGE = "#555555"
ARROW = {"arrowstyle": "-|>", "color": "#333333", "lw": 1.4, "shrinkA": 2, "shrinkB": 2}


def box(ax, x, y, w, h, text, color, size=10.5, weight="normal"):
  """Draws a rounded box with centred text; returns its (left, right, mid-y) anchors."""
  patch = FancyBboxPatch(
    (x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.12", fc=color, ec=EDGE, lw=1.1
  )
  ax.add_patch(patch)
  ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, weight=weight)
  return (x, y + h / 2), (x + w, y + h / 2)


def arrow(ax, start, end):
  ax.annotate("", xy=end, xytext=start, arrowprops=ARROW)


def note(ax, x, y, text, size=9, color="#444444"):
  ax.text(x, y, text, ha="center", va="center", fontsize=size, style="italic", color=color)


def header(ax, x, text):
  ax.text(x, 6.2, text, ha="center", va="center", fontsize=12, weight="bold", color="#222222")


def main():
  fig = plt.figure(figsize=(WIDTH, HEIGHT), dpi=100, facecolor="white")
  ax = fig.add_axes((0, 0, 1, 1))
  ax.set_xlim(0, WIDTH)
  ax.set_ylim(0, HEIGHT)
  ax.axis("off")
  ax.text(WIDTH / 2, 6.72, "AnySat encoder", ha="center", fontsize=18, weight="bold")

  header(ax, 1.6, "1. Inputs (any subset)")
  header(ax, 4.95, "2. Per-modality projectors")
  header(ax, 8.05, "3. Shared spatial encoder")
  header(ax, 11.2, "4. Combiner")
  header(ax, 14.45, "5. Outputs")

  rows = [4.85, 3.45, 2.05]  # bottom y of the three modality rows
  inputs = [
    "aerial 0.2 m\n(C, H, W)",
    "Sentinel-2 10 m\ntime series (T, C, H, W)\n+ dates",
    "Sentinel-1 10 m\ntime series\n(T, C, H, W) + dates",
  ]
  projs = [
    "VHR projector:\nconv on sub-patches\n+ MLP",
    "L-TAE projector per pixel\n(temporal attention\nover dates)",
    "L-TAE projector per pixel\n(temporal attention\nover dates)",
  ]
  enc_text = (
    "transformer with\nrelative position\nencoding (iRPE)\nover the sub-patches\nof each patch\n\n"
    "shared by all\nmodalities\n\n→ 1 token per patch\nper modality\n(+ sub-patch tokens\n"
    "kept for dense output)"
  )
  enc_l, enc_r = box(ax, 6.85, 2.05, 2.4, 3.95, enc_text, COLORS["enc"], size=10)
  for y, text_in, text_proj in zip(rows, inputs, projs, strict=True):
    _, in_r = box(ax, 0.3, y, 2.6, 1.15, text_in, COLORS["input"])
    pr_l, pr_r = box(ax, 3.65, y, 2.6, 1.15, text_proj, COLORS["proj"])
    arrow(ax, in_r, pr_l)
    arrow(ax, pr_r, (enc_l[0], y + 0.575))
  sensors = "… 11 sensors: aerial, aerial-flair, spot,\nnaip, s2, s1-asc, s1, alos, l7, l8, modis"
  note(ax, 1.6, 1.55, sensors)
  patches = "tile cut into patches of P m (multiple of 10 m),\neach patch into sub-patches\n"
  note(ax, 4.95, 1.5, patches + "(the modality's pixels or 10-px conv blocks)")

  sa_text = (
    "self-attention transformer over\n[class token] + all modalities'\npatch tokens\n\n"
    "MODIS enters as a single\ncontext token"
  )
  sa_l, _ = box(ax, 9.75, 4.15, 2.9, 1.85, sa_text, COLORS["comb"], size=10)
  ca_text = (
    "cross-attention block:\nlearned queries (1 tile query\n+ 1 per patch, sin-cos\n"
    "positions) read the sequence"
  )
  _, ca_r = box(ax, 9.75, 2.05, 2.9, 1.75, ca_text, COLORS["comb"], size=10)
  arrow(ax, (enc_r[0], 5.075), sa_l)
  arrow(ax, (11.2, 4.15), (11.2, 3.8))

  outs = [
    (4.85, "tile\n(B, E)"),
    (3.45, "patch\n(B, n, n, E)"),
    (2.05, "dense (B, n·k, n·k, 2E):\npatch token ⊕\nsub-patch token"),
  ]
  for y, text in outs:
    out_l, _ = box(ax, 13.15, y, 2.6, 1.15, text, COLORS["out"], weight="bold")
    arrow(ax, ca_r, out_l)
  # Skip connection: sub-patch tokens go around the combiner to the dense output.
  ax.plot([8.05, 8.05, 14.45], [2.05, 1.0, 1.0], ls="--", color="#888888", lw=1.3)
  skip = {**ARROW, "color": "#888888", "linestyle": "--"}
  ax.annotate("", xy=(14.45, 2.05), xytext=(14.45, 1.0), arrowprops=skip)
  note(ax, 11.25, 1.2, "sub-patch tokens (skip the combiner)", size=9.5, color="#666666")

  pretrain = "pretraining: JEPA (student predicts EMA-teacher patch tokens of masked blocks)"
  pretrain += " + contrastive loss, on GeoPlex (5 datasets)"
  ax.text(WIDTH / 2, 0.35, pretrain, ha="center", va="center", fontsize=10, color="#444444")
  fig.savefig(OUT, dpi=100, facecolor="white")
  plt.close(fig)
  print(f"wrote {OUT}")


if __name__ == "__main__":
  main()
