"""The reference product's model families, written out compactly (torchvision cannot be
imported beside torch 2.13 here). Layouts follow the published architectures; sizes are the
real ones (channel widths, depths), so parameter counts match the originals. Detection models
end at their raw head outputs (no anchor decoding or NMS, which stay outside the INT8 graph in
deployed models too).

No pretrained weights can be had offline: `randomized(model, images)` gives random weights,
random BatchNorm affine parameters, and BatchNorm running statistics estimated on real photos,
so activations have realistic, non-trivial statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cbr(cin: int, cout: int, k: int = 3, s: int = 1, g: int = 1, act: type[nn.Module] | None = nn.ReLU, p: int | None = None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, s, k // 2 if p is None else p, groups=g, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act(inplace=True) if act in (nn.ReLU, nn.ReLU6, nn.SiLU) else act())
    return nn.Sequential(*layers)


# ---- ResNet (v1.5: stride on the 3x3 conv) -----------------------------------------------------


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        self.conv1 = cbr(cin, width, 3, stride)
        self.conv2 = cbr(width, width, 3, act=None)
        self.down = cbr(cin, width, 1, stride, act=None) if stride != 1 or cin != width else nn.Identity()

    def forward(self, x):
        return F.relu(self.conv2(self.conv1(x)) + self.down(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        out = width * 4
        self.conv1 = cbr(cin, width, 1)
        self.conv2 = cbr(width, width, 3, stride)
        self.conv3 = cbr(width, out, 1, act=None)
        self.down = cbr(cin, out, 1, stride, act=None) if stride != 1 or cin != out else nn.Identity()

    def forward(self, x):
        return F.relu(self.conv3(self.conv2(self.conv1(x))) + self.down(x))


class ResNetBackbone(nn.Module):
    def __init__(self, block, layers=(3, 4, 6, 3), strides=(1, 2, 2, 2)):
        super().__init__()
        self.stem = nn.Sequential(cbr(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], 64
        for width, n, s in zip((64, 128, 256, 512)[: len(layers)], layers, strides):
            blocks = []
            for i in range(n):
                blocks.append(block(cin, width, s if i == 0 else 1))
                cin = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.out_channels = cin

    def forward(self, x):
        feats = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class ResNet50(nn.Module):
    def __init__(self, classes: int = 1000):
        super().__init__()
        self.backbone = ResNetBackbone(Bottleneck)
        self.fc = nn.Linear(2048, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.backbone(x)[-1], 1), 1))


# ---- EfficientNet B0 and V2-S ------------------------------------------------------------------


class SE(nn.Module):
    def __init__(self, c: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, s: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [cbr(cin, hidden, 1, act=nn.SiLU)] if expand != 1 else []
        layers += [cbr(hidden, hidden, k, s, g=hidden, act=nn.SiLU), SE(hidden, max(1, cin // 4)), cbr(hidden, cout, 1, act=None)]
        self.block = nn.Sequential(*layers)
        self.residual = s == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class FusedMBConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, s: int, expand: int):
        super().__init__()
        if expand == 1:
            self.block = cbr(cin, cout, k, s, act=nn.SiLU)
        else:
            self.block = nn.Sequential(cbr(cin, cin * expand, k, s, act=nn.SiLU), cbr(cin * expand, cout, 1, act=None))
        self.residual = s == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class EfficientNet(nn.Module):
    # (block, expand, kernel, stride, channels, repeats)
    B0 = [("mb", 1, 3, 1, 16, 1), ("mb", 6, 3, 2, 24, 2), ("mb", 6, 5, 2, 40, 2), ("mb", 6, 3, 2, 80, 3), ("mb", 6, 5, 1, 112, 3), ("mb", 6, 5, 2, 192, 4), ("mb", 6, 3, 1, 320, 1)]
    V2_S = [("fused", 1, 3, 1, 24, 2), ("fused", 4, 3, 2, 48, 4), ("fused", 4, 3, 2, 64, 4), ("mb", 4, 3, 2, 128, 6), ("mb", 6, 3, 1, 160, 9), ("mb", 6, 3, 2, 256, 15)]

    def __init__(self, config, stem: int, classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = [cbr(3, stem, 3, 2, act=nn.SiLU)]
        cin = stem
        for kind, e, k, s, c, n in config:
            for i in range(n):
                layers.append((MBConv if kind == "mb" else FusedMBConv)(cin, c, k, s if i == 0 else 1, e))
                cin = c
        layers.append(cbr(cin, 1280, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, classes)

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def efficientnet_b0() -> nn.Module:
    return EfficientNet(EfficientNet.B0, 32)


def efficientnet_v2_s() -> nn.Module:
    return EfficientNet(EfficientNet.V2_S, 24)


# ---- ConvNeXt-T --------------------------------------------------------------------------------


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pw1 = nn.Linear(dim, 4 * dim)
        self.pw2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))  # layer scale

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.norm(y)))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), classes: int = 1000):
        super().__init__()
        stages: list[nn.Module] = []
        for i, (d, dim) in enumerate(zip(depths, dims)):
            down = nn.Sequential(nn.Conv2d(3, dim, 4, 4), LayerNorm2d(dim, eps=1e-6)) if i == 0 else nn.Sequential(LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], dim, 2, 2))
            stages.append(nn.Sequential(down, *[ConvNeXtBlock(dim) for _ in range(d)]))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], classes)

    def forward(self, x):
        return self.head(self.norm(self.stages(x).mean((2, 3))))


# ---- RetinaNet (ResNet50-FPN) ------------------------------------------------------------------


class FPN(nn.Module):
    """P3-P5 from C3-C5 (lateral 1x1, top-down nearest upsampling + add, 3x3), P6-P7 by stride 2."""

    def __init__(self, in_channels=(512, 1024, 2048), out: int = 256):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, out, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(out, out, 3, padding=1) for _ in in_channels)
        self.p6 = nn.Conv2d(out, out, 3, 2, 1)
        self.p7 = nn.Conv2d(out, out, 3, 2, 1)

    def forward(self, feats):
        lat = [l(f) for l, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[-2:], mode="nearest")
        outs = [o(x) for o, x in zip(self.output, lat)]
        p6 = self.p6(outs[-1])
        return outs + [p6, self.p7(F.relu(p6))]


class RetinaHead(nn.Module):
    def __init__(self, c: int = 256, anchors: int = 9, classes: int = 91):
        super().__init__()
        self.classes = classes
        self.cls_tower = nn.Sequential(*[m for _ in range(4) for m in (nn.Conv2d(c, c, 3, padding=1), nn.ReLU())])
        self.box_tower = nn.Sequential(*[m for _ in range(4) for m in (nn.Conv2d(c, c, 3, padding=1), nn.ReLU())])
        self.cls = nn.Conv2d(c, anchors * classes, 3, padding=1)
        self.box = nn.Conv2d(c, anchors * 4, 3, padding=1)

    def forward(self, feats):
        b = feats[0].shape[0]
        cls = [self.cls(self.cls_tower(f)).permute(0, 2, 3, 1).reshape(b, -1, self.classes) for f in feats]
        box = [self.box(self.box_tower(f)).permute(0, 2, 3, 1).reshape(b, -1, 4) for f in feats]
        return torch.cat(cls, 1), torch.cat(box, 1)


class RetinaNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = ResNetBackbone(Bottleneck)
        self.fpn = FPN()
        self.head = RetinaHead()

    def forward(self, x):
        return self.head(self.fpn(self.backbone(x)[1:]))


# ---- SSD heads, SSD-MobileNet (v1) and SSD-ResNet34 --------------------------------------------


class SSDHead(nn.Module):
    def __init__(self, channels, anchors, classes: int):
        super().__init__()
        self.classes = classes
        self.cls = nn.ModuleList(nn.Conv2d(c, a * classes, 3, padding=1) for c, a in zip(channels, anchors))
        self.box = nn.ModuleList(nn.Conv2d(c, a * 4, 3, padding=1) for c, a in zip(channels, anchors))

    def forward(self, feats):
        b = feats[0].shape[0]
        cls = [h(f).permute(0, 2, 3, 1).reshape(b, -1, self.classes) for h, f in zip(self.cls, feats)]
        box = [h(f).permute(0, 2, 3, 1).reshape(b, -1, 4) for h, f in zip(self.box, feats)]
        return torch.cat(cls, 1), torch.cat(box, 1)


def _dw_sep(cin: int, cout: int, s: int) -> nn.Sequential:
    return nn.Sequential(cbr(cin, cin, 3, s, g=cin, act=nn.ReLU6), cbr(cin, cout, 1, act=nn.ReLU6))


def _extra(cin: int, mid: int, cout: int, s: int = 2, act=nn.ReLU, p: int = 1) -> nn.Sequential:
    return nn.Sequential(cbr(cin, mid, 1, act=act), cbr(mid, cout, 3, s, act=act, p=p))


class SSDMobileNet(nn.Module):
    """SSD with a MobileNet v1 backbone (depthwise separable, ReLU6), as in MLPerf's SSD-MobileNet."""

    def __init__(self, classes: int = 91):
        super().__init__()
        cfg = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2)] + [(512, 512, 1)] * 5
        self.body1 = nn.Sequential(cbr(3, 32, 3, 2, act=nn.ReLU6), *[_dw_sep(*c) for c in cfg])  # stride 16, 512 ch
        self.body2 = nn.Sequential(_dw_sep(512, 1024, 2), _dw_sep(1024, 1024, 1))  # stride 32
        self.extras = nn.ModuleList([_extra(1024, 256, 512, act=nn.ReLU6), _extra(512, 128, 256, act=nn.ReLU6), _extra(256, 128, 256, act=nn.ReLU6), _extra(256, 64, 128, act=nn.ReLU6)])
        self.head = SSDHead((512, 1024, 512, 256, 256, 128), (3, 6, 6, 6, 6, 6), classes)

    def forward(self, x):
        f1 = self.body1(x)
        feats = [f1, self.body2(f1)]
        for e in self.extras:
            feats.append(e(feats[-1]))
        return self.head(feats)


class SSDResNet34(nn.Module):
    """MLPerf's SSD-ResNet34: ResNet34 to conv4_x with conv4_x at stride 1, five extra stages."""

    def __init__(self, classes: int = 81):
        super().__init__()
        self.backbone = ResNetBackbone(BasicBlock, layers=(3, 4, 6), strides=(1, 2, 1))
        self.extras = nn.ModuleList([_extra(256, 256, 512), _extra(512, 256, 512), _extra(512, 128, 256), _extra(256, 128, 256), _extra(256, 128, 256)])
        self.head = SSDHead((256, 512, 512, 256, 256, 256), (4, 6, 6, 6, 4, 4), classes)

    def forward(self, x):
        feats = [self.backbone(x)[-1]]
        for e in self.extras:
            feats.append(e(feats[-1]))
        return self.head(feats)


# ---- YOLOv5s and YOLOX-s -----------------------------------------------------------------------


def conv(cin: int, cout: int, k: int = 1, s: int = 1, p: int | None = None) -> nn.Sequential:
    return cbr(cin, cout, k, s, act=nn.SiLU, p=p)


class YoloBottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool):
        super().__init__()
        self.cv1, self.cv2 = conv(c, c, 1), conv(c, c, 3)
        self.add = shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP bottleneck with three convs (YOLOv5's C3, YOLOX's CSPLayer)."""

    def __init__(self, cin: int, cout: int, n: int = 1, shortcut: bool = True):
        super().__init__()
        c = cout // 2
        self.cv1, self.cv2, self.cv3 = conv(cin, c), conv(cin, c), conv(2 * c, cout)
        self.m = nn.Sequential(*[YoloBottleneck(c, shortcut) for _ in range(n)])

    def forward(self, x):
        return self.cv3(torch.cat([self.m(self.cv1(x)), self.cv2(x)], 1))


class SPPF(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.cv1, self.cv2 = conv(cin, cin // 2), conv(cin * 2, cout)

    def forward(self, x):
        x = self.cv1(x)
        y1 = F.max_pool2d(x, 5, 1, 2)
        y2 = F.max_pool2d(y1, 5, 1, 2)
        return self.cv2(torch.cat([x, y1, y2, F.max_pool2d(y2, 5, 1, 2)], 1))


class SPP(nn.Module):
    """YOLOX's SPP bottleneck: parallel 5/9/13 max pools."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.cv1, self.cv2 = conv(cin, cin // 2), conv(cin * 2, cout)

    def forward(self, x):
        x = self.cv1(x)
        return self.cv2(torch.cat([x] + [F.max_pool2d(x, k, 1, k // 2) for k in (5, 9, 13)], 1))


class PAN(nn.Module):
    """YOLOv5 / YOLOX path aggregation neck over (P3, P4, P5) = (128, 256, 512) channels."""

    def __init__(self):
        super().__init__()
        self.lat0 = conv(512, 256)
        self.c3_p4 = C3(512, 256, 1, False)
        self.red1 = conv(256, 128)
        self.c3_p3 = C3(256, 128, 1, False)
        self.down2 = conv(128, 128, 3, 2)
        self.c3_n3 = C3(256, 256, 1, False)
        self.down1 = conv(256, 256, 3, 2)
        self.c3_n4 = C3(512, 512, 1, False)

    def forward(self, p3, p4, p5):
        x0 = self.lat0(p5)
        f = self.c3_p4(torch.cat([F.interpolate(x0, scale_factor=2.0, mode="nearest"), p4], 1))
        x1 = self.red1(f)
        out3 = self.c3_p3(torch.cat([F.interpolate(x1, scale_factor=2.0, mode="nearest"), p3], 1))
        out4 = self.c3_n3(torch.cat([self.down2(out3), x1], 1))
        out5 = self.c3_n4(torch.cat([self.down1(out4), x0], 1))
        return out3, out4, out5


class YOLOv5(nn.Module):
    """YOLOv5s (v6.0 layout: 6x6 stem conv, C3, SPPF), raw Detect outputs with sigmoid."""

    def __init__(self, classes: int = 80):
        super().__init__()
        self.no = classes + 5
        self.stem = nn.Sequential(conv(3, 32, 6, 2, 2), conv(32, 64, 3, 2), C3(64, 64, 1))
        self.p3 = nn.Sequential(conv(64, 128, 3, 2), C3(128, 128, 2))
        self.p4 = nn.Sequential(conv(128, 256, 3, 2), C3(256, 256, 3))
        self.p5 = nn.Sequential(conv(256, 512, 3, 2), C3(512, 512, 1), SPPF(512, 512))
        self.neck = PAN()
        self.detect = nn.ModuleList(nn.Conv2d(c, 3 * self.no, 1) for c in (128, 256, 512))

    def forward(self, x):
        p3 = self.p3(self.stem(x))
        p4 = self.p4(p3)
        feats = self.neck(p3, p4, self.p5(p4))
        b = x.shape[0]
        outs = [d(f).view(b, 3, self.no, f.shape[2], f.shape[3]).permute(0, 1, 3, 4, 2).reshape(b, -1, self.no) for d, f in zip(self.detect, feats)]
        return torch.sigmoid(torch.cat(outs, 1))


class Focus(nn.Module):
    """YOLOX's stem: space-to-depth by strided slicing, then a 3x3 conv."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = conv(cin * 4, cout, 3)

    def forward(self, x):
        return self.conv(torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1))


class YOLOX(nn.Module):
    """YOLOX-s: Focus + CSPDarknet + PAFPN + decoupled head (reg, obj, cls per level)."""

    def __init__(self, classes: int = 80):
        super().__init__()
        self.stem = nn.Sequential(Focus(3, 32), conv(32, 64, 3, 2), C3(64, 64, 1))
        self.dark3 = nn.Sequential(conv(64, 128, 3, 2), C3(128, 128, 3))
        self.dark4 = nn.Sequential(conv(128, 256, 3, 2), C3(256, 256, 3))
        self.dark5 = nn.Sequential(conv(256, 512, 3, 2), SPP(512, 512), C3(512, 512, 1, False))
        self.neck = PAN()
        self.stems = nn.ModuleList(conv(c, 128) for c in (128, 256, 512))
        self.cls_convs = nn.ModuleList(nn.Sequential(conv(128, 128, 3), conv(128, 128, 3)) for _ in range(3))
        self.reg_convs = nn.ModuleList(nn.Sequential(conv(128, 128, 3), conv(128, 128, 3)) for _ in range(3))
        self.cls_preds = nn.ModuleList(nn.Conv2d(128, classes, 1) for _ in range(3))
        self.reg_preds = nn.ModuleList(nn.Conv2d(128, 4, 1) for _ in range(3))
        self.obj_preds = nn.ModuleList(nn.Conv2d(128, 1, 1) for _ in range(3))

    def forward(self, x):
        p3 = self.dark3(self.stem(x))
        p4 = self.dark4(p3)
        outs = []
        for i, f in enumerate(self.neck(p3, p4, self.dark5(p4))):
            f = self.stems[i](f)
            reg = self.reg_convs[i](f)
            y = torch.cat([self.reg_preds[i](reg), torch.sigmoid(self.obj_preds[i](reg)), torch.sigmoid(self.cls_preds[i](self.cls_convs[i](f)))], 1)
            outs.append(y.flatten(2))
        return torch.cat(outs, 2).permute(0, 2, 1)


# ---- random weights with real statistics -------------------------------------------------------


def randomized(model: nn.Module, images: torch.Tensor, seed: int = 0) -> nn.Module:
    """Random BatchNorm affine parameters and ConvNeXt layer scales, then BatchNorm running
    statistics estimated on `images` (real photos), so every layer sees realistic activations."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.8 + 0.6)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the estimation batches
            if isinstance(m, ConvNeXtBlock):
                m.gamma.copy_(torch.rand(m.gamma.shape, generator=g) * 0.4 + 0.1)
        model.train()
        for i in range(0, len(images), 4):
            model(images[i : i + 4])
    return model.eval()


def with_real_statistics(family: str = "ResNet50", size: int = 224) -> nn.Module:
    """A family by name, `randomized` on 16 photo crops of `size` pixels: the factory the
    benchmark recipes (recipes/bench/) name."""
    from .images import crops

    families = {f.__name__: f for f in (ResNet50, efficientnet_b0, efficientnet_v2_s, ConvNeXt, RetinaNet, SSDMobileNet, SSDResNet34, YOLOv5, YOLOX)}
    if family not in families:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(families)}")
    return randomized(families[family](), crops(16, size, seed=0))
