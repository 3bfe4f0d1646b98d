"""The built-in example: a small CNN on scikit-learn's bundled digits (8x8 images, 10 classes).

`python -m torchq.examples.digits` trains it (seconds on CPU, deterministic), quantizes it with
the default QuantConfig, and prints float vs INT8 accuracy on held-back data. The pieces are
importable, so recipes and tests use the same model and data:
`torchq.examples.digits:build_model`, `:load_trained`, `:calibration_loader`, `:evaluate`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

SEED = 0


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = self.features(x)
        x = x.mean(dim=(2, 3))
        return self.head(x)


def build_model() -> nn.Module:
    torch.manual_seed(SEED)
    return DigitsCNN()


def load_data() -> dict[str, np.ndarray]:
    """Train / test split of the digits, images scaled to [0, 1], shape (N, 1, 8, 8)."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=SEED, stratify=y)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def train(model: nn.Module, epochs: int = 30) -> nn.Module:
    data = load_data()
    torch.manual_seed(SEED)
    loader = DataLoader(TensorDataset(torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"])), batch_size=64, shuffle=True)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        sched.step()
    return model.eval()


def load_trained(cache_dir: str | Path | None = None) -> nn.Module:
    """The trained model; weights cached in `cache_dir` (if given) so training runs once."""
    model = build_model()
    path = Path(cache_dir) / "digits_cnn.pt" if cache_dir else None
    if path is not None and path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    train(model)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval()


def calibration_loader(batch_size: int = 32, num_samples: int = 256) -> DataLoader:
    """(inputs, target) batches from the training split."""
    data = load_data()
    ds = TensorDataset(torch.from_numpy(data["x_train"][:num_samples]), torch.from_numpy(data["y_train"][:num_samples]))
    return DataLoader(ds, batch_size=batch_size)


def test_set() -> tuple[np.ndarray, np.ndarray]:
    data = load_data()
    return data["x_test"], data["y_test"]


def evaluate(model) -> float:
    """Top-1 accuracy (%) on the held-back split, of a torch module or an ONNX model/path."""
    x, y = test_set()
    if isinstance(model, nn.Module):
        with torch.no_grad():
            logits = model.eval()(torch.from_numpy(x)).numpy()
    else:
        import onnxruntime as ort

        data = model if isinstance(model, (str, Path)) else model.SerializeToString()
        session = ort.InferenceSession(str(data) if isinstance(data, Path) else data, providers=["CPUExecutionProvider"])
        logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    return float((logits.argmax(1) == y).mean() * 100)


def main(argv: list[str] | None = None) -> int:
    import torchq

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/digits", help="output folder (default out/digits)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    model = load_trained(out)
    t1 = time.perf_counter()
    x_example = torch.from_numpy(test_set()[0][:1])
    config = torchq.QuantConfig()
    qpath = out / "digits.int8.onnx"
    qmodel = torchq.quantize(model, calibration_loader(), (x_example,), config, qpath, input_names=["image"], output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    t2 = time.perf_counter()
    float_acc, int8_acc = evaluate(model), evaluate(qmodel)
    import npu
    from onnx_backend import validate

    check = npu.check(qmodel, target=config.target)
    placement = check.summary()
    host = ", ".join(f"{r.op_type} {r.node}" for r in check.host_nodes)
    print(f"digits CNN ({sum(p.numel() for p in model.parameters())} parameters), trained in {t1 - t0:.1f} s")
    print(f"quantized with {config.method} ({'symmetric' if config.symmetric else 'asymmetric'}, per-channel weights, target {config.target}) in {t2 - t1:.1f} s")
    print(f"float accuracy (PyTorch):     {float_acc:6.2f} %")
    print(f"INT8 accuracy (onnxruntime):  {int8_acc:6.2f} %   ({int8_acc / float_acc * 100:.2f} % of float)")
    print(f"TFLite spec check:            {'all rules hold' if not validate(qmodel) else 'BROKEN RULES'}")
    print(f"{f'NPU check ({config.target}):':30s}{placement['npu']} of {placement['npu'] + placement['host']} ops on the NPU, {placement['host']} on the host" + (f" ({host}: the Linear head writing the logits, float)" if host else ""))
    print(f"INT8 model written to {qpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
