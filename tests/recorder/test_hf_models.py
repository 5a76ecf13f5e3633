"""Hugging Face models as people train them: small configs, random weights, nothing downloaded.

Called the standard way (``model(input_ids=...)``, ``model(pixel_values=...)``): GPT-2
with its default tied ``wte``/``lm_head``, BERT and ViT, exact against the whole-model
oracle (float64, per-sample autograd loop, 1e-5) and bit-identical in training. Eager
attention is asked for because SDPA kernels are not all available in float64 or under
torch.func; GPT-2's ``Conv1D`` has no closed-form rule here and goes through the torch.func
fallback, which is what its exactness tests.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from oracle_support import check_bit_identical, check_exact
from torch import Tensor, nn

pytestmark = pytest.mark.usefixtures("float64_default")

N, T, V, CLASSES = 4, 6, 50, 3


def _ids() -> Tensor:
    return torch.randint(0, V, (N, T), generator=torch.Generator().manual_seed(1))


def _labels() -> Tensor:
    return torch.tensor([0, 1, 2, 1])


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=V,
        n_positions=16,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    return transformers.GPT2LMHeadModel(config).train()


def _lm_loss(model: nn.Module) -> Tensor:
    ids = _ids()
    logits = model(input_ids=ids).logits[:, :-1]
    per_token = F.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none")
    return per_token.reshape(N, -1).mean(1)


def _bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=V,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=CLASSES,
        attn_implementation="eager",
    )
    return transformers.BertForSequenceClassification(config).train()


def _bert_loss(model: nn.Module) -> Tensor:
    return F.cross_entropy(model(input_ids=_ids()).logits, _labels(), reduction="none")


def _vit() -> nn.Module:
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=CLASSES,
        attn_implementation="eager",
    )
    return transformers.ViTForImageClassification(config).train()


def _vit_loss(model: nn.Module) -> Tensor:
    pixels = torch.randn(N, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    return F.cross_entropy(model(pixel_values=pixels).logits, _labels(), reduction="none")


MODELS = {"gpt2": (_gpt2, _lm_loss), "bert": (_bert, _bert_loss), "vit": (_vit, _vit_loss)}


def test_gpt2_ties_its_head_to_the_token_embedding_by_default() -> None:
    model = _gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("name", list(MODELS))
def test_hf_model_is_exact(tmp_path, name: str) -> None:
    make, loss = MODELS[name]
    got = check_exact(tmp_path, make, loss)
    if name == "gpt2":
        # The tied weight is the embedding's, counted once; lm_head is no row of its own.
        assert "transformer.wte" in got["names"]
        assert "lm_head" not in got["names"]


@pytest.mark.parametrize("name", list(MODELS))
def test_hf_model_trains_bit_identically(tmp_path, name: str) -> None:
    make, loss = MODELS[name]
    check_bit_identical(tmp_path, make, loss)
