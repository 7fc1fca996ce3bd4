"""Which image files a ``detect`` command line names: files, folders and glob patterns."""
from __future__ import annotations

import glob
from collections.abc import Iterable
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def expand_inputs(arguments: Iterable[str]) -> list[Path]:
    """Image files, in command-line order: a file as given, a folder's images (recursively,
    sorted), or the image files a glob pattern (``**`` allowed) matches. Each file once.

    Raises ``FileNotFoundError`` naming the first argument that yields no image.
    """
    found: dict[Path, None] = {}
    for argument in arguments:
        path = Path(argument)
        if path.is_file():
            matches = [path]
        elif path.is_dir():
            matches = _images_in(path)
        else:
            matches = sorted(Path(p) for p in glob.glob(argument, recursive=True)
                             if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_SUFFIXES)
        if not matches:
            raise FileNotFoundError(f"{argument}: no such file, or no images in it / matching it")
        found.update(dict.fromkeys(matches))
    return list(found)


def output_names(images: list[Path]) -> list[str]:
    """One distinct output file name per image: its own name, with ``-2``, ``-3``... added to
    repeated stems (two folders may hold ``img.jpg`` each); formats PIL cannot write become
    ``.png``."""
    names: list[str] = []
    taken: set[str] = set()
    for image in images:
        suffix = image.suffix.lower() if image.suffix.lower() in (".jpg", ".jpeg", ".png",
                                                                  ".bmp", ".webp") else ".png"
        name, counter = image.stem + suffix, 1
        while name.lower() in taken:
            counter += 1
            name = f"{image.stem}-{counter}{suffix}"
        taken.add(name.lower())
        names.append(name)
    return names
