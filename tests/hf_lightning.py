"""A LightningModule around a real transformers BertModel (tiny config) on padded token batches,
for the Lightning callback test in tests/test_hf_models.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import Dataset

from tests import hf_models as hf


class PaddedTokens(Dataset):
    """{input_ids, attention_mask, label} items of 12 tokens with random real lengths; the label
    is whether the first token's id is above the middle of the vocabulary."""

    def __init__(self, n: int, seed: int = 0):
        b = hf.batch("bert", n, 12, seed)
        self.ids, self.mask = b["input_ids"], b["attention_mask"]
        self.label = (self.ids[:, 0] > hf.VOCAB // 2).long()

    def __len__(self):
        return len(self.label)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "label": self.label[i]}


class TokenClassifier(LightningModule):
    """forward(input_ids, attention_mask) -> logits of the mean-pooled real tokens."""

    def __init__(self):
        super().__init__()
        self.encoder = hf.tiny("bert")
        self.head = nn.Linear(32, 2)

    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask[..., None].to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["label"])

    def validation_step(self, batch, batch_idx):
        logits = self(batch["input_ids"], batch["attention_mask"])
        self.log("val_acc", (logits.argmax(1) == batch["label"]).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)
