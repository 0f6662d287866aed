"""``concept-exclusion train`` data: a folder of images with same-name ``.txt`` captions, and its order.

Invariants: every image and caption is read and checked by ``scan_dataset``, before step 1 (a bad
file stops the run with one line naming it, not at the step that first draws it); images are at most
``MAX_PIXELS`` (a PNG header may claim any size) and 16-bit images keep their range. Determinism:
which images micro-batch m sees, and the seed of its noise, timesteps and caption dropout, depend on
(seed, m, process rank) alone, so a resumed run replays the same batches.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from concept_exclusion.errors import ConceptExclusionError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_PIXELS = 8192 * 8192
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


@dataclass
class Example:
    image: Path
    caption: str


def scan_dataset(folder: str | Path) -> list[Example]:
    """Images (sorted by file name) with their same-name ``.txt`` captions."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConceptExclusionError(f"--data {folder}: not a folder")
    examples = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        caption_file = path.with_suffix(".txt")
        check_image(path)
        if caption_file.is_file():
            caption = read_caption(caption_file)
        else:
            log.warning("%s has no caption file %s: training it with an empty caption", path, caption_file.name)
            caption = ""
        examples.append(Example(path, caption))
    if not examples:
        raise ConceptExclusionError(f"--data {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return examples


def read_caption(path: Path) -> str:
    """A caption file as UTF-8 text (a BOM allowed); anything else is one ``ConceptExclusionError`` line."""
    try:
        return path.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise ConceptExclusionError(f"{path}: caption is not UTF-8 text (byte {exc.start}); re-save it as UTF-8") \
            from None
    except OSError as exc:
        raise ConceptExclusionError(f"{path}: cannot read caption ({exc.strerror or exc})") from None


def _open(path: Path):
    """``Image.open`` with the size checked from the header, before any pixel is decoded."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise ConceptExclusionError(f"{path}: image is too large ({str(exc)[:80]}); at most {MAX_PIXELS} pixels "
                                    f"are read") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ConceptExclusionError(f"{path}: cannot read image ({str(exc)[:200] or type(exc).__name__})") from None
    width, height = im.size
    if width < 1 or height < 1 or width * height > MAX_PIXELS:
        im.close()
        raise ConceptExclusionError(f"{path}: image is too large ({width}x{height}); at most {MAX_PIXELS} pixels "
                                    f"are read")
    return im


def check_image(path: Path) -> None:
    """Open and fully decode one image (its size checked first), so that a bad file is found before training."""
    from PIL import Image

    im = _open(path)
    try:
        with im:
            im.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ConceptExclusionError(f"{path}: cannot read image ({str(exc)[:200] or type(exc).__name__})") from None


def dataset_fingerprint(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(f"{e.image.name}\0{e.image.stat().st_size}\0{e.caption}\n".encode())
    return h.hexdigest()


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """[3, R, R] in [-1, 1]: shorter side resized to R, then center-cropped."""
    from PIL import Image

    try:
        with _open(path) as im:
            if im.mode in _SIXTEEN_BIT:  # 16-bit grey: scaled from its own range, not clipped at 255
                grey = Image.fromarray(np.asarray(im, dtype=np.float32) / 65535.0, mode="F")
                plane = np.asarray(_resize_crop(grey, resolution), dtype=np.float32).clip(0.0, 1.0) * 2.0 - 1.0
                arr = np.stack([plane] * 3, axis=-1)
            else:
                arr = np.asarray(_resize_crop(im.convert("RGB"), resolution), dtype=np.float32) / 127.5 - 1.0
    except (OSError, ValueError, SyntaxError) as exc:
        raise ConceptExclusionError(f"{path}: cannot read image ({str(exc)[:200] or type(exc).__name__})") from None
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()


def _resize_crop(im, resolution: int):
    """Shorter side resized to ``resolution`` (bicubic, in float), then center-cropped to a square."""
    from PIL import Image

    scale = resolution / min(im.size)
    size = (max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale)))
    im = im.resize(size, Image.BICUBIC)
    left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
    return im.crop((left, top, left + resolution, top + resolution))


_ORDER, _NOISE = 0, 1


def derived_seed(seed: int, stream: int, *counters: int) -> int:
    """A 63-bit seed that depends on (seed, stream, counters) only: 'order' per epoch, 'noise' per micro-batch."""
    entropy = [seed & 0xFFFFFFFFFFFFFFFF, stream, *counters]
    state = int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])  # numpy 1.x: no uint64 >> int
    return state >> 1


def micro_batch_seed(seed: int, micro_step: int, rank: int) -> int:
    """The seed of one micro-batch's noise, timesteps, VAE sample and caption dropout."""
    return derived_seed(seed, _NOISE, micro_step, rank)


def batch_indices(micro_step: int, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Example indices of micro-batch ``micro_step`` on process ``rank``: epoch e is a permutation seeded by
    (seed, e), cut into micro-batches of ``batch_size * world`` (a tail shorter than that is skipped)."""
    per_step = batch_size * world
    per_epoch = n // per_step
    if per_epoch < 1:
        raise ConceptExclusionError(f"--data has {n} images, fewer than batch_size x processes = {per_step}")
    epoch, position = divmod(micro_step, per_epoch)
    g = torch.Generator().manual_seed(derived_seed(seed, _ORDER, epoch))
    order = torch.randperm(n, generator=g).tolist()
    start = position * per_step + rank * batch_size
    return order[start:start + batch_size]


def concept_regions(locator, examples, resolution: int, progress: bool = True) -> torch.Tensor:
    """[n, 1, R, R] bool: where ``locator`` finds the concept in each training image, as the trainer crops it.
    Found once before training (the images and crops never change), so the per-step cost is an index."""
    from tqdm.auto import tqdm

    out = torch.zeros(len(examples), 1, resolution, resolution, dtype=torch.bool)
    for i, example in enumerate(tqdm(examples, desc="finding the concept", unit="image", disable=not progress)):
        out[i] = locator.masks(load_image(example.image, resolution)[None])[0] > 0
    return out

