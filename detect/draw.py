"""Boxes, class names and scores drawn onto an image, readable at any image size.

Line width and text size scale with the image's longer side; each label is white text with a
dark outline on a box filled with its class colour, placed above the box (inside it when the
box touches the top edge).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LINE_WIDTH_PER_PIXEL = 1 / 320     # 2 px lines at 640 px, 6 px at 1920 px
FONT_SIZE_PER_PIXEL = 1 / 45       # 14 px text at 640 px, 43 px at 1920 px
MIN_LINE_WIDTH, MIN_FONT_SIZE = 2, 12
# Saturated, mutually distinct colours that keep white text readable; class id modulo 16.
PALETTE = ((230, 25, 75), (60, 140, 60), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (0, 150, 150), (240, 50, 230), (128, 128, 0), (170, 110, 40), (0, 0, 128),
           (128, 0, 0), (70, 100, 255), (200, 150, 0), (100, 100, 100), (255, 80, 80),
           (0, 100, 60))


def class_colour(class_id: int) -> tuple[int, int, int]:
    """The colour of a class id: neighbouring ids get different colours."""
    return PALETTE[int(class_id) % len(PALETTE)]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):   # Pillow without FreeType: fixed small bitmap font
        return ImageFont.load_default()


def draw_detections(pixels: np.ndarray, boxes_xyxy: Sequence[Sequence[float]],
                    class_ids: Sequence[int], labels: Sequence[str]) -> Image.Image:
    """An RGB copy of ``pixels`` ``[H, W, 3]`` uint8 with each box (xmin, ymin, xmax, ymax in
    pixels) outlined in its class colour and tagged with its label text."""
    image = Image.fromarray(pixels, "RGB")
    side = max(image.size)
    width = max(MIN_LINE_WIDTH, round(side * LINE_WIDTH_PER_PIXEL))
    font = _font(max(MIN_FONT_SIZE, round(side * FONT_SIZE_PER_PIXEL)))
    stroke = max(1, width // 2)
    canvas = ImageDraw.Draw(image)
    for box, class_id in zip(boxes_xyxy, class_ids):
        canvas.rectangle([float(v) for v in box], outline=class_colour(class_id), width=width)
    for box, class_id, text in zip(boxes_xyxy, class_ids, labels):
        left, top, right, bottom = canvas.textbbox((0, 0), text, font=font, stroke_width=stroke)
        text_w, text_h = right - left, bottom - top
        pad = width
        x = min(max(float(box[0]), 0.0), max(image.width - text_w - 2 * pad, 0))
        y = float(box[1]) - text_h - 2 * pad
        if y < 0:
            y = max(float(box[1]), 0.0)
        canvas.rectangle([x, y, x + text_w + 2 * pad, y + text_h + 2 * pad],
                         fill=class_colour(class_id))
        canvas.text((x + pad - left, y + pad - top), text, font=font, fill=(255, 255, 255),
                    stroke_width=stroke, stroke_fill=(0, 0, 0))
    return image
