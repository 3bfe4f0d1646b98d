"""The architectures users bring, for the compatibility suite (bench/compatibility.py): torchvision
classification, detection and segmentation, timm families, the YOLOX head of the reference
product's table and HuggingFace transformers (tests/hf_models.py).

Random weights (nothing downloads), with BatchNorm statistics estimated on natural-photo crops
(`bench.seed_models.randomized`: random affine parameters, running statistics as a cumulative
average over the crops in train mode) so that every layer sees realistic activations. Small
inputs: 64 px for classifiers (the smallest size each architecture takes where it is larger),
128 px for detectors and segmenters.

Detectors are exported up to their raw head outputs (per-anchor class logits and box
regressions, FCOS's centerness): torchvision's postprocessing (anchor decoding, score threshold,
NMS, top-k) is data-dependent control flow on float boxes that no INT8 target runs; a deployment
quantizes the network and keeps that on the host. YOLOX writes one tensor that concatenates box
coordinates with sigmoid objectness and class scores; its `parts` are compared separately.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

IMAGE = 64  # classifiers
DETECTION = 128  # detectors and segmenters: the smallest size every FPN level still has pixels at


@dataclass
class Arch:
    name: str
    family: str  # torchvision, torchvision-detection, torchvision-segmentation, timm, reference, hf
    build: Callable[[], nn.Module]  # eval mode, realistic BatchNorm statistics
    inputs: Callable[[int, int], dict[str, torch.Tensor]]  # (n, seed) -> model inputs by name, batch n
    input_names: list[str]
    output_names: list[str]
    # output -> {part: slice of its last axis}: outputs whose parts are compared separately
    parts: dict[str, dict[str, slice]] = field(default_factory=dict)
    notes: str = ""
    quick: bool = False  # one of the quick subset (tests/test_compatibility_quick.py)

    @property
    def dynamic_axes(self) -> dict:
        if self.family == "hf":
            from tests import hf_models as hf

            return hf.dynamic_axes(self.name.removeprefix("hf_"))
        return {n: {0: "batch"} for n in [*self.input_names, *self.output_names]}

    def call(self, model: nn.Module, inputs: dict[str, torch.Tensor]):
        """HF models take their inputs by keyword (GPT-2's second positional is the cache)."""
        return model(**inputs) if self.family == "hf" else model(*inputs.values())

    def export_args(self, inputs: dict[str, torch.Tensor]) -> tuple[tuple, dict]:
        return ((), dict(inputs)) if self.family == "hf" else (tuple(inputs.values()), {})

    def outputs(self, result) -> list[torch.Tensor]:
        if self.family == "hf":
            return [result.last_hidden_state]
        return list(result) if isinstance(result, (tuple, list)) else [result]


def _images(size: int) -> Callable[[int, int], dict[str, torch.Tensor]]:
    def make(n: int, seed: int) -> dict[str, torch.Tensor]:
        from .images import crops

        return {"image": crops(n, size, seed)}

    return make


def _realistic(model: nn.Module, size: int) -> nn.Module:
    from .images import crops
    from .seed_models import randomized

    for m in model.modules():  # zero-initialized layers (torchvision ViT's head) would make a constant output
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not m.weight.any():
            m.reset_parameters()
    return randomized(model.eval(), crops(16, size, seed=7))


def _torchvision(name: str, size: int = IMAGE, **kwargs) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return _realistic(torchvision.models.get_model(name, weights=None, **kwargs), size)


def _maxvit(size: int = IMAGE) -> nn.Module:
    from torchvision.models.maxvit import MaxVit

    # maxvit_t's configuration; its window and grid partitions of 7 need 224 px inputs, so the
    # partition is 2 at 64 px (the same blocks on the 2 x 2 grid the last stage has)
    torch.manual_seed(0)
    model = MaxVit(input_size=(size, size), stem_channels=64, partition_size=2, block_channels=[64, 128, 256, 512], block_layers=[2, 2, 5, 2], head_dim=32, stochastic_depth_prob=0.0)
    return _realistic(model, size)


def _timm(name: str, size: int = IMAGE, **kwargs) -> nn.Module:
    import timm

    torch.manual_seed(0)
    return _realistic(timm.create_model(name, pretrained=False, **kwargs), size)


class DetectionHead(nn.Module):
    """A torchvision detector's backbone (with FPN) and head, up to the raw head outputs."""

    def __init__(self, detector: nn.Module, outputs: tuple[str, ...]):
        super().__init__()
        self.backbone, self.head, self.outputs = detector.backbone, detector.head, outputs

    def forward(self, x):
        features = self.backbone(x)
        features = list(features.values()) if isinstance(features, dict) else [features]
        out = self.head(features)
        return tuple(out[k] for k in self.outputs)


class SegmentationOut(nn.Module):
    """A torchvision segmenter's 'out' map (its aux head is off)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


def _detector(name: str, outputs: tuple[str, ...], **kwargs) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, **kwargs)
    return _realistic(DetectionHead(model, outputs), DETECTION)


def _segmenter(name: str) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    aux = {} if name.startswith("lraspp") else {"aux_loss": False}  # LRASPP has no aux head
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, **aux)
    return _realistic(SegmentationOut(model), DETECTION)


def _yolox() -> nn.Module:
    from .seed_models import YOLOX

    torch.manual_seed(0)
    return _realistic(YOLOX(), DETECTION)


def _hf(family: str) -> Arch:
    from tests import hf_models as hf

    names = hf.input_names(family)

    def inputs(n: int, seed: int) -> dict[str, torch.Tensor]:
        return hf.batch(family, n, 12, seed)

    return Arch(f"hf_{family}", "hf", partial(hf.tiny, family), inputs, names, ["last_hidden_state"], notes="tiny config (tests/hf_models.py), padded batches with attention masks" if family != "vit" else "tiny config")


def _cls(name: str, build: Callable[[], nn.Module], family: str, size: int = IMAGE, notes: str = "", quick: bool = False) -> Arch:
    return Arch(name, family, build, _images(size), ["image"], ["logits"], notes=notes or f"{size} px", quick=quick)


TORCHVISION = [
    ("resnet18", {}), ("resnet50", {}), ("mobilenet_v2", {}), ("mobilenet_v3_small", {}), ("mobilenet_v3_large", {}),
    ("efficientnet_b0", {}), ("efficientnet_v2_s", {}), ("convnext_tiny", {}), ("regnet_y_400mf", {}),
    ("shufflenet_v2_x1_0", {}), ("densenet121", {}), ("googlenet", dict(aux_logits=False, init_weights=False)),
    ("squeezenet1_1", {}), ("mnasnet1_0", {}), ("vit_b_16", dict(image_size=IMAGE)), ("swin_t", {}),
]  # fmt: skip
TORCHVISION_QUICK = {"resnet18", "mobilenet_v3_large", "shufflenet_v2_x1_0"}

TIMM = [
    ("cspresnet50", {}), ("repvgg_a0", {}), ("ghostnet_100", {}), ("mobilevit_xxs", {}), ("levit_128s", dict(img_size=IMAGE)),
    ("edgenext_xx_small", {}), ("fastvit_t8", {}), ("mobilenetv4_conv_small", {}), ("efficientformer_l1", dict(size=224)),
    ("convnextv2_atto", {}), ("deit_tiny_patch16_224", dict(img_size=IMAGE)), ("poolformer_s12", {}), ("mixnet_s", {}),
    ("rexnet_100", {}), ("mobileone_s0", {}), ("hgnetv2_b0", {}), ("efficientvit_b0", {}), ("repvit_m0_9", {}),
]  # fmt: skip
TIMM_QUICK = {"deit_tiny_patch16_224", "ghostnet_100"}


def _arches() -> dict[str, Arch]:
    arches = [_cls(n, partial(_torchvision, n, **kw), "torchvision", quick=n in TORCHVISION_QUICK) for n, kw in TORCHVISION]
    arches.append(_cls("inception_v3", partial(_torchvision, "inception_v3", 96, aux_logits=False, init_weights=False), "torchvision", 96, "96 px (its smallest input is 75 px)"))
    arches.append(_cls("maxvit_t", _maxvit, "torchvision", notes="64 px, maxvit_t's blocks with a partition size of 2 (7 needs 224 px)"))
    det = _images(DETECTION)
    arches += [
        Arch("ssdlite320_mobilenet_v3_large", "torchvision-detection", partial(_detector, "ssdlite320_mobilenet_v3_large", ("bbox_regression", "cls_logits")), det, ["image"], ["bbox_regression", "cls_logits"], notes="128 px, raw head outputs (no anchor decoding / NMS)", quick=True),
        Arch("retinanet_resnet50_fpn", "torchvision-detection", partial(_detector, "retinanet_resnet50_fpn", ("bbox_regression", "cls_logits")), det, ["image"], ["bbox_regression", "cls_logits"], notes="128 px, raw head outputs (no anchor decoding / NMS)"),
        Arch("fcos_resnet50_fpn", "torchvision-detection", partial(_detector, "fcos_resnet50_fpn", ("bbox_regression", "cls_logits", "bbox_ctrness")), det, ["image"], ["bbox_regression", "cls_logits", "bbox_ctrness"], notes="128 px, raw head outputs (no decoding / NMS)"),
        Arch("yolox_s", "reference", _yolox, det, ["image"], ["detections"], parts={"detections": {"boxes": slice(0, 4), "objectness": slice(4, 5), "classes": slice(5, None)}}, notes="128 px, bench/seed_models.YOLOX: one Concat of box coordinates, sigmoid objectness and class scores", quick=True),
    ]  # fmt: skip
    for name in ("deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large", "fcn_resnet50"):
        arches.append(Arch(name, "torchvision-segmentation", partial(_segmenter, name), det, ["image"], ["out"], notes="128 px, the 'out' map"))
    for n, kw in TIMM:
        size = kw.get("size", IMAGE)  # EfficientFormer's attention biases are sized for 224 px (7 x 7 at stride 32)
        arches.append(_cls(n, partial(_timm, n, **kw), "timm", size, f"{size} px", quick=n in TIMM_QUICK))
    from tests import hf_models as hf

    arches += [_hf(f) for f in hf.FAMILIES]
    by_name = {a.name: a for a in arches}
    by_name["hf_bert"].quick = True
    return by_name


ARCHES: dict[str, Arch] = _arches()
QUICK = [n for n, a in ARCHES.items() if a.quick]
