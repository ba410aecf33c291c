"""The zoo's model registry: real torchvision, timm and transformers models with random weights and small inputs.

Every builder seeds the global generator, builds the model with random weights (nothing is downloaded) and returns
``(model, example_input)``: a tensor for the image classifiers, a dict of keyword arguments for the transformers
models. :func:`call` runs a model on such an input and :func:`output_tensor` picks the one tensor the checks compare.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

Example = Tensor | dict[str, Tensor]
Builder = Callable[[], tuple[nn.Module, Example]]

BATCH = 2  # samples per example input
IMAGE = 64  # side of the example images, where the model allows it
TOKENS = 8  # tokens per example sequence
VOCAB = 96


@dataclass(frozen=True)
class ZooModel:
    """One entry of the zoo.

    Attributes:
        name: the id used in test names and in the coverage table (``<source>/<model>``).
        family: the model family shown in the coverage table.
        source: ``"torchvision"``, ``"timm"`` or ``"transformers"``.
        build: returns ``(model, example_input)``, seeded, random weights, train mode.
        fast: whether the model is in the fast subset (``make test``).
        note: what the model stands for in the zoo (the structure it exercises).
    """

    name: str
    family: str
    source: str
    build: Builder
    fast: bool
    note: str = ""


def images(side: int = IMAGE, batch: int = BATCH, seed: int = 1) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, side, side, generator=generator)


def tokens(batch: int = BATCH, length: int = TOKENS, seed: int = 1) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=generator)


def like(example: Example, seed: int) -> Example:
    """Another random example of the same shape and kind (a different batch for the same model)."""
    if isinstance(example, Tensor):
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(example.shape, generator=generator, dtype=example.dtype)
    result = {}
    for key, value in example.items():
        if key.endswith("input_ids"):
            result[key] = tokens(value.shape[0], value.shape[1], seed=seed + len(result))
        else:
            result[key] = value.clone()
    return result


def call(model: nn.Module, example: Example) -> Any:
    """Run ``model`` on an example input: keyword arguments for a dict, one positional argument otherwise."""
    if isinstance(example, dict):
        return model(**example)
    return model(example)


def output_tensor(output: Any) -> Tensor:
    """The one tensor of a model's output that the checks compare.

    Transformers outputs: ``last_hidden_state`` (base models) or ``logits``; GoogLeNet/Inception v3 in train mode
    return a named tuple whose first field is ``logits``.
    """
    if isinstance(output, Tensor):
        return output
    for key in ("last_hidden_state", "logits"):
        value = getattr(output, key, None)
        if isinstance(value, Tensor):
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"no output tensor in a {type(output).__name__}")


# ---------------------------------------------------------------------------------------------------- torchvision
def _torchvision(name: str, side: int = IMAGE, **kwargs: Any) -> Builder:
    def build() -> tuple[nn.Module, Example]:
        import torchvision

        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None, **kwargs)
        return model.train(), images(side)

    return build


# ---------------------------------------------------------------------------------------------------------- timm
def _timm(name: str, side: int = IMAGE, **kwargs: Any) -> Builder:
    def build() -> tuple[nn.Module, Example]:
        import timm

        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, **kwargs)
        return model.train(), images(side)

    return build


# -------------------------------------------------------------------------------------------------- transformers
def _bert() -> tuple[nn.Module, Example]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        hidden_act="relu",
        max_position_embeddings=32,
    )
    ids = tokens()
    return BertModel(config).train(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _t5() -> tuple[nn.Module, Example]:
    from transformers import T5Config, T5Model

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=16,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        feed_forward_proj="relu",
        decoder_start_token_id=0,
    )
    return T5Model(config).train(), {"input_ids": tokens(), "decoder_input_ids": tokens(length=TOKENS // 2, seed=2)}


def _opt() -> tuple[nn.Module, Example]:
    from transformers import OPTConfig, OPTModel

    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=48,
        num_attention_heads=2,
        max_position_embeddings=32,
        word_embed_proj_dim=32,
        activation_function="relu",
        pad_token_id=0,
    )
    ids = tokens()
    return OPTModel(config).train(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _albert() -> tuple[nn.Module, Example]:
    from transformers import AlbertConfig, AlbertModel

    torch.manual_seed(0)
    config = AlbertConfig(
        vocab_size=VOCAB,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=48,
        hidden_act="relu",
        max_position_embeddings=32,
    )
    ids = tokens()
    return AlbertModel(config).train(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _distilbert() -> tuple[nn.Module, Example]:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    config = DistilBertConfig(
        vocab_size=VOCAB,
        dim=32,
        n_layers=2,
        n_heads=2,
        hidden_dim=48,
        activation="relu",
        max_position_embeddings=32,
        num_labels=3,
    )
    ids = tokens()
    model = DistilBertForSequenceClassification(config).train()
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _z(name: str, family: str, source: str, build: Builder, fast: bool, note: str = "") -> ZooModel:
    return ZooModel(f"{source}/{name}", family, source, build, fast, note)


MODELS: list[ZooModel] = [
    # torchvision
    _z("resnet18", "ResNet", "torchvision", _torchvision("resnet18"), True, "residual blocks, reused self.relu"),
    _z("resnext50_32x4d", "ResNeXt", "torchvision", _torchvision("resnext50_32x4d"), False, "grouped bottlenecks"),
    _z("vgg11_bn", "VGG-BN", "torchvision", _torchvision("vgg11_bn"), False, "features/classifier split"),
    _z("alexnet", "AlexNet", "torchvision", _torchvision("alexnet"), False, "features/classifier split"),
    _z("squeezenet1_1", "SqueezeNet", "torchvision", _torchvision("squeezenet1_1"), True, "Fire modules read by cat"),
    _z("densenet121", "DenseNet", "torchvision", _torchvision("densenet121"), False, "dense blocks, functional relu"),
    _z("googlenet", "GoogLeNet", "torchvision", _torchvision("googlenet", init_weights=True), False,
       "functional relu, aux heads"),
    _z("inception_v3", "Inception v3", "torchvision", _torchvision("inception_v3", side=299, init_weights=True), False,
       "functional relu, aux head"),
    _z("mobilenet_v2", "MobileNet v2", "torchvision", _torchvision("mobilenet_v2"), True, "depthwise, ReLU6"),
    _z("mobilenet_v3_small", "MobileNet v3", "torchvision", _torchvision("mobilenet_v3_small"), True,
       "depthwise, squeeze-excitation"),
    _z("shufflenet_v2_x0_5", "ShuffleNet v2", "torchvision", _torchvision("shufflenet_v2_x0_5"), False,
       "channel split and shuffle"),
    _z("mnasnet0_5", "MnasNet", "torchvision", _torchvision("mnasnet0_5"), True, "depthwise"),
    _z("regnet_x_400mf", "RegNet", "torchvision", _torchvision("regnet_x_400mf"), False, "grouped convs"),
    _z("regnet_y_400mf", "RegNet", "torchvision", _torchvision("regnet_y_400mf"), False, "grouped convs, SE"),
    # timm
    _z("resnet18", "ResNet (timm)", "timm", _timm("resnet18"), False, "timm residual blocks"),
    _z("regnetx_002", "RegNet (timm)", "timm", _timm("regnetx_002"), True, "BatchNormAct2d"),
    _z("dpn68b", "DPN", "timm", _timm("dpn68b"), False, "dual path, BatchNormAct2d"),
    _z("nf_resnet26", "NF-ResNet", "timm", _timm("nf_resnet26"), False, "normalizer-free, weight standardisation"),
    _z("mobilenetv2_050", "MobileNet v2 (timm)", "timm", _timm("mobilenetv2_050"), True, "depthwise, ReLU6, BNAct"),
    _z("mobilenetv3_small_050", "MobileNet v3 (timm)", "timm", _timm("mobilenetv3_small_050"), True,
       "depthwise, SE"),
    _z("rexnet_100", "ReXNet", "timm", _timm("rexnet_100"), False, "depthwise, ReLU6"),
    _z("mnasnet_small", "MnasNet (timm)", "timm", _timm("mnasnet_small"), False, "depthwise"),
    # transformers
    _z("bert", "BERT", "transformers", _bert, True, "encoder"),
    _z("t5", "T5", "transformers", _t5, True, "encoder-decoder, bias-free"),
    _z("opt", "OPT", "transformers", _opt, True, "decoder, (batch*tokens, features) MLP"),
    _z("albert", "ALBERT", "transformers", _albert, True, "one layer shared by every depth"),
    _z("distilbert", "DistilBERT", "transformers", _distilbert, False, "encoder with a classification head"),
]

BY_NAME: dict[str, ZooModel] = {entry.name: entry for entry in MODELS}
assert len(BY_NAME) == len(MODELS), "zoo model names must be unique"
