"""Real HuggingFace transformers modules built from tiny configs (random weights), and padded
batches for them: the families users bring, for tests/test_hf_models.py (and recipes: the
factories and loaders are importable by name).

Text models get a large initializer_range, so that attention is peaked and padding changes the
float outputs on the real tokens a lot (the tests check that it does): a mask that stopped
masking in the INT8 model would show. GPT-2 is padded on the left (causal attention: right
padding never reaches a real token) and built with use_cache=False (a DynamicCache output is
not a tensor the exporters take).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
import transformers as T

VOCAB = 99
TEXT_FAMILIES = ("bert", "distilbert", "roberta", "albert", "electra", "deberta_v2", "t5_encoder", "gpt2")
FAMILIES = TEXT_FAMILIES + ("vit",)
INIT = 0.3  # initializer_range of the text models
IMAGE = 16


def tiny(family: str, seed: int = 0) -> torch.nn.Module:
    """A 2-layer, 32-wide model of `family`, in eval mode."""
    torch.manual_seed(seed)
    bert_like = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64, initializer_range=INIT)
    if family == "bert":
        model = T.BertModel(T.BertConfig(**bert_like))
    elif family == "roberta":
        model = T.RobertaModel(T.RobertaConfig(**bert_like, pad_token_id=1))
    elif family == "distilbert":
        model = T.DistilBertModel(T.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64, initializer_range=INIT))
    elif family == "albert":
        model = T.AlbertModel(T.AlbertConfig(**bert_like, embedding_size=16))
    elif family == "electra":
        model = T.ElectraModel(T.ElectraConfig(**bert_like, embedding_size=16))
    elif family == "deberta_v2":  # relative attention with log-bucketed positions
        model = T.DebertaV2Model(T.DebertaV2Config(**bert_like, relative_attention=True, position_buckets=8, max_relative_positions=16, pos_att_type=["p2c", "c2p"]))
    elif family == "t5_encoder":  # relative-position buckets: log of the distance, cast to int
        model = T.T5EncoderModel(T.T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=20, initializer_factor=1.5))
    elif family == "gpt2":
        model = T.GPT2Model(T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, initializer_range=INIT, use_cache=False))
    elif family == "vit":
        model = T.ViTModel(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=IMAGE, patch_size=4, num_channels=3))
    else:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return model.eval()


def input_names(family: str) -> list[str]:
    return ["pixel_values"] if family == "vit" else ["input_ids", "attention_mask"]


def dynamic_axes(family: str) -> dict:
    if family == "vit":
        return {"pixel_values": {0: "batch"}, "last_hidden_state": {0: "batch"}}
    return {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}, "last_hidden_state": {0: "batch", 1: "tokens"}}


def batch(family: str, size: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """Model inputs: token ids with an attention mask of random real lengths (>= 2; the first
    sentence is never padded), or images."""
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(size, 3, IMAGE, IMAGE, generator=g)}
    ids = torch.randint(2, VOCAB, (size, length), generator=g)
    mask = torch.ones(size, length, dtype=torch.long)
    for i in range(1, size):
        real = int(torch.randint(2, length + 1, (1,), generator=g))
        if family == "gpt2":
            mask[i, : length - real] = 0
        else:
            mask[i, real:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def calibration_batches(family: str, n: int = 4) -> list[dict[str, torch.Tensor]]:
    return [batch(family, 4, 12, seed) for seed in range(n)]


def padded_loader(family: str = "bert", n: int = 4) -> list[dict[str, torch.Tensor]]:
    """For recipes: `calibration.loader: tests.hf_models:padded_loader`."""
    return calibration_batches(family, n)


def tiny_bert() -> torch.nn.Module:
    """For recipes: `model.factory: tests.hf_models:tiny_bert`."""
    return tiny("bert")


def real_token_mask(inputs: dict[str, torch.Tensor], hidden: np.ndarray) -> np.ndarray:
    if "attention_mask" not in inputs:
        return np.ones(hidden.shape[:2] + (1,), np.float32)
    return inputs["attention_mask"].numpy()[..., None].astype(np.float32)


def pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The mean of the real tokens' hidden states (sentence-transformers' pooling)."""
    return (hidden * mask).sum(1) / mask.sum(1)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def float_hidden(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        return model(**inputs).last_hidden_state.numpy()


def tensors_feeding_integer_casts(model: onnx.ModelProto) -> set[str]:
    """Float tensors whose values reach a Cast to an integer type through float ops only."""
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types |= {t.name: t.data_type for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    found: set[str] = set()
    frontier = [n.input[0] for n in model.graph.node if n.op_type == "Cast" and next(a.i for a in n.attribute if a.name == "to") not in floats]
    while frontier:
        t = frontier.pop()
        node = producer.get(t)
        if t in found or node is None or types.get(t) not in floats:
            continue  # a graph input or a constant, or not a float: no Q/DQ can sit there
        found.add(t)
        frontier.extend(i for i in node.input if i)
    return found
