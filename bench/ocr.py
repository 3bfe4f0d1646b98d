"""Real pretrained OCR models as users have them: PaddleOCR's text recognizer (PP-OCRv4 rec, a
CTC model) and orientation classifier (ppocr mobile v2.0 cls), as paddle2onnx wrote them, from
the `rapidocr-onnxruntime` wheel (the `bench` extra); and the text they read, rendered offline.

Text lines are rendered with PIL in matplotlib's bundled DejaVu fonts (sans, serif, mono; plain,
bold, oblique), from the characters of the recognizer's own dictionary (shipped in the model's
metadata) that those fonts draw: words, numbers, dates, codes and punctuation, on light
backgrounds of varied contrast, with small shifts and noise. Every line comes from a seed, so
calibration and evaluation lines are disjoint and reproducible.

Inputs are preprocessed exactly as rapidocr does (resize to height 48 keeping the aspect ratio,
(x / 255 - 0.5) / 0.5, right-padded with zeros), at one fixed width so lines batch.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx

REC_MODEL = "ch_PP-OCRv4_rec_infer.onnx"
CLS_MODEL = "ch_ppocr_mobile_v2.0_cls_infer.onnx"
REC_SHAPE = (48, 320)  # rapidocr's rec_img_shape (height, width)
CLS_SHAPE = (48, 192)  # rapidocr's cls_image_shape
FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
)
WORDS = (
    "invoice total amount date order number customer address street city phone email page "
    "report account balance payment due item quantity price tax discount shipping name the of "
    "and for with from model serial version release station platform north south east west "
    "open closed monday friday january october meeting room floor exit entrance parking "
    "Hello World Quality Control Warning Danger Notice Reference Table Figure Section Chapter"
).split()


def model_path(name: str) -> Path:
    """A model file shipped in the rapidocr-onnxruntime wheel (`pip install rapidocr-onnxruntime`;
    the `bench` extra pins it). Located without importing the package (it imports OpenCV)."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or spec.origin is None:
        raise SystemExit("the OCR benchmark needs the rapidocr-onnxruntime wheel: pip install -e '.[bench]'")
    path = Path(spec.origin).parent / "models" / name
    if not path.is_file():
        raise SystemExit(f"{path} is missing from the installed rapidocr-onnxruntime")
    return path


def load(name: str) -> onnx.ModelProto:
    return onnx.load(str(model_path(name)))


@lru_cache(maxsize=1)
def dictionary() -> tuple[str, ...]:
    """The recognizer's CTC classes: blank, the dictionary in its metadata, then ' ' (rapidocr's
    CTCLabelDecode)."""
    meta = {p.key: p.value for p in load(REC_MODEL).metadata_props}
    return ("<blank>", *meta["character"].splitlines(), " ")


@lru_cache(maxsize=1)
def _alphabet() -> str:
    """The dictionary's printable ASCII characters (DejaVu draws them all)."""
    return "".join(sorted(c for c in dictionary()[1:-1] if len(c) == 1 and 33 <= ord(c) < 127))


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def random_text(rng: np.random.Generator) -> str:
    """One line: 1-4 tokens, each a word (any case), a number, a date, an amount or a code."""
    alphabet = _alphabet()
    tokens = []
    for _ in range(int(rng.integers(1, 5))):
        kind = rng.random()
        if kind < 0.45:
            w = str(rng.choice(WORDS))
            tokens.append(w.upper() if rng.random() < 0.2 else w.capitalize() if rng.random() < 0.3 else w)
        elif kind < 0.6:
            tokens.append(str(int(rng.integers(0, 10 ** int(rng.integers(1, 7))))))
        elif kind < 0.7:
            tokens.append(f"{int(rng.integers(1, 29)):02d}/{int(rng.integers(1, 13)):02d}/{int(rng.integers(1990, 2031))}")
        elif kind < 0.8:
            tokens.append(f"${rng.integers(0, 10000)}.{int(rng.integers(0, 100)):02d}")
        else:
            tokens.append("".join(rng.choice(list(alphabet), size=int(rng.integers(2, 8)))))
    text = " ".join(tokens)
    if rng.random() < 0.3:
        text += str(rng.choice(list(".,:;!?")))
    return text[:28]


def render_line(text: str, rng: np.random.Generator) -> np.ndarray:
    """An RGB uint8 image (H, W, 3) of `text`: dark ink on a light background, a DejaVu font."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(_font_dir() / FONTS[int(rng.integers(len(FONTS)))]), int(rng.integers(22, 40)))
    left, top, right, bottom = font.getbbox(text)
    pad_x, pad_y = int(rng.integers(4, 16)), int(rng.integers(3, 10))
    size = (right - left + 2 * pad_x, bottom - top + 2 * pad_y)
    background = tuple(int(v) for v in rng.integers(170, 256, size=3))
    ink = tuple(int(v) for v in rng.integers(0, 90, size=3))
    image = Image.new("RGB", size, background)
    ImageDraw.Draw(image).text((pad_x - left, pad_y - top), text, font=font, fill=ink)
    pixels = np.asarray(image, np.float32) + rng.normal(0.0, rng.uniform(0.0, 8.0), size=(size[1], size[0], 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def preprocess(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """rapidocr's resize_norm_img: height `shape[0]`, width by aspect ratio up to `shape[1]`,
    (x / 255 - 0.5) / 0.5, zero padding on the right. (3, H, W) float32."""
    from PIL import Image

    height, width = shape
    h, w = image.shape[:2]
    resized_w = min(width, int(np.ceil(height * w / h)))
    resized = np.asarray(Image.fromarray(image).resize((resized_w, height), Image.BILINEAR), np.float32)
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :resized_w] = (resized.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return out


@dataclass
class Lines:
    texts: list[str]
    images: list[np.ndarray]  # RGB uint8, each its own size


def lines(n: int, seed: int) -> Lines:
    """n lines, each short enough to fill the recognizer's width at its height without being
    squeezed (rapidocr widens the input instead; a fixed width keeps lines batchable)."""
    rng = np.random.default_rng(seed)
    limit = REC_SHAPE[1] / REC_SHAPE[0]
    texts, images = [], []
    while len(texts) < n:
        text = random_text(rng)
        image = render_line(text, rng)
        while image.shape[1] / image.shape[0] > limit and " " in text.strip():
            text = text.strip().rsplit(" ", 1)[0]
            image = render_line(text, rng)
        if image.shape[1] / image.shape[0] <= limit:
            texts.append(text)
            images.append(image)
    return Lines(texts, images)


def recognizer_inputs(batch: Lines) -> np.ndarray:
    return np.stack([preprocess(im, REC_SHAPE) for im in batch.images])


def classifier_inputs(batch: Lines) -> tuple[np.ndarray, np.ndarray]:
    """Each line upright and rotated 180 degrees (the classifier's two classes: '0', '180'),
    interleaved; and the labels (0 upright, 1 rotated)."""
    crops = []
    for im in batch.images:
        crops += [preprocess(im, CLS_SHAPE), preprocess(np.ascontiguousarray(im[::-1, ::-1]), CLS_SHAPE)]
    return np.stack(crops), np.tile([0, 1], len(batch.images))


def ctc_greedy(probs: np.ndarray) -> list[str]:
    """rapidocr's CTCLabelDecode: argmax per time step, repeats merged, blanks dropped."""
    classes = dictionary()
    out = []
    for idx in probs.argmax(axis=2):
        keep = np.ones(idx.size, bool)
        keep[1:] = idx[1:] != idx[:-1]
        keep &= idx != 0
        out.append("".join(classes[i] for i in idx[keep]))
    return out
