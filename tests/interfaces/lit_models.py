"""Tiny LightningModules on the real digits data, for the callback tests (importable by
spawned processes, so they live in a module rather than in the test file)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from torchq.examples.digits import load_data


def digits_tensors(split: str = "train", n: int | None = None, scale: float = 1.0):
    d = load_data()
    x, y = torch.from_numpy(d[f"x_{split}"][:n]) * scale, torch.from_numpy(d[f"y_{split}"][:n])
    return x, y


def loader(split: str = "train", n: int | None = 256, batch_size: int = 32, scale: float = 1.0, shuffle: bool = False) -> DataLoader:
    return DataLoader(TensorDataset(*digits_tensors(split, n, scale)), batch_size=batch_size, shuffle=shuffle)


class DigitsClassifier(LightningModule):
    """forward(x) -> logits; validation_step logs val_acc (accuracy in [0, 1]) and val_loss."""

    def __init__(self, width: int = 8, lr: float = 1e-2, batchnorm: bool = True):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width) if batchnorm else nn.Identity(),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, 10),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        logits = self(x)
        self.log("val_acc", (logits.argmax(1) == y).float().mean())
        self.log("val_loss", F.cross_entropy(logits, y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class NetOnlyValidation(DigitsClassifier):
    """validation_step calls self.net directly, never self(...): no INT8 metric is possible."""

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())


class DictDataset(Dataset):
    def __init__(self, split: str, n: int):
        self.x, self.y = digits_tensors(split, n)
        self.gain = torch.linspace(0.5, 1.5, len(self.y))

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"image": self.x[i], "gain": self.gain[i : i + 1], "label": self.y[i]}


class KeywordClassifier(LightningModule):
    """forward(image, *, gain): a keyword-only input of a different shape than the image, so a
    mixed-up input order fails loudly. Batches are dicts that also hold the label."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(9, 10)

    def forward(self, image, *, gain):
        return self.head(torch.cat([self.features(image), gain], dim=1))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["image"], gain=batch["gain"]), batch["label"])

    def validation_step(self, batch, batch_idx):
        logits = self(image=batch["image"], gain=batch["gain"])
        self.log("val_acc", (logits.argmax(1) == batch["label"]).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class QATScalesInSync(Callback):
    """For the DDP QAT test: at the end of fit, every rank writes the sums of its torchq_qat
    parameters and of its weights, so the test can compare the ranks."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        import json
        from pathlib import Path

        qat = {n: float(p.detach().double().sum()) for n, p in pl_module.named_parameters() if n.startswith("torchq_qat.")}
        weights = float(sum(p.detach().double().sum() for n, p in pl_module.named_parameters() if not n.startswith("torchq_qat.")))
        Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps({"qat": qat, "weights": weights}))
