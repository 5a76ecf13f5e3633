"""Per-sample gradient norms, one file per layer family, and the registry that maps them."""

from __future__ import annotations

from torch import nn

from samplescope.recorder.layers.activation import prelu_norms
from samplescope.recorder.layers.attention import AttentionObserver, attention_declines
from samplescope.recorder.layers.base import (
    HookObserver,
    NormFn,
    Observer,
    Session,
    StepResult,
    directional_alignment,
)
from samplescope.recorder.layers.bilinear import BilinearObserver
from samplescope.recorder.layers.conv import ConvNorms
from samplescope.recorder.layers.embedding import (
    EmbeddingBagObserver,
    EmbeddingObserver,
    embedding_bag_declines,
    embedding_declines,
)
from samplescope.recorder.layers.fallback import FallbackObserver
from samplescope.recorder.layers.linear import LinearObserver
from samplescope.recorder.layers.norm import (
    batch_norm_norms,
    group_norm_norms,
    instance_norm_norms,
    layer_norm_norms,
    rms_norm_norms,
)
from samplescope.recorder.layers.registry import (
    LayerRegistry,
    OnUnsupported,
    Rule,
    UnsupportedLayerError,
)
from samplescope.recorder.layers.rnn import RNNObserver

__all__ = [
    "AttentionObserver",
    "EmbeddingObserver",
    "FallbackObserver",
    "HookObserver",
    "LayerRegistry",
    "LinearObserver",
    "NormFn",
    "Observer",
    "OnUnsupported",
    "RNNObserver",
    "Rule",
    "Session",
    "StepResult",
    "UnsupportedLayerError",
    "default_registry",
    "directional_alignment",
]


def default_registry() -> LayerRegistry:
    """A fresh registry with every layer family samplescope knows, and the torch.func fallback.

    Lookups go through the class's MRO, so subclasses of these classes resolve too.
    """
    registry = LayerRegistry(fallback=FallbackObserver)
    registry.register(nn.Linear, Rule(LinearObserver))
    # Hugging Face's GPT-2 Linear with the weight stored [in, out]: the same squared norms.
    # Registered by name, so transformers is never imported (see LayerRegistry).
    registry.register("transformers.pytorch_utils.Conv1D", Rule(LinearObserver))
    registry.register(nn.Bilinear, Rule(BilinearObserver))
    registry.register(nn.PReLU, prelu_norms)
    for conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        registry.register(conv, Rule(_conv_observer))
    registry.register(nn.Embedding, Rule(EmbeddingObserver, declines=embedding_declines))
    registry.register(nn.EmbeddingBag, Rule(EmbeddingBagObserver, declines=embedding_bag_declines))
    registry.register(nn.LayerNorm, layer_norm_norms)
    registry.register(nn.RMSNorm, rms_norm_norms)
    registry.register(nn.GroupNorm, group_norm_norms)
    # Not _BatchNorm: SyncBatchNorm normalises with statistics of every rank.
    for batch_norm in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        registry.register(batch_norm, batch_norm_norms)
    for instance_norm in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
        registry.register(instance_norm, instance_norm_norms)
    registry.register(
        nn.MultiheadAttention,
        Rule(AttentionObserver, claims_children=True, declines=attention_declines),
    )
    for recurrent in (nn.LSTM, nn.GRU, nn.RNN):
        registry.register(recurrent, Rule(RNNObserver))
    return registry


def _conv_observer(name: str, module: nn.Module, session: Session) -> Observer:
    # A ConvNorms per layer; the per-shape method choice is shared (identical layers agree).
    return HookObserver(name, module, session, ConvNorms())
