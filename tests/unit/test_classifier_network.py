"""The mean-pooled classifier head (export/classifier_network.py) on the real offline base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, BartConfig

from export.classifier_network import MEAN_POOL_MODEL_TYPE, BertMeanPoolForSequenceClassification
from training.classifier import MINILM, load_base, resolve_base_model


@pytest.fixture(scope="module")
def minilm() -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    model, tokenizer = load_base(MINILM, pooling="mean")
    return model.eval(), tokenizer


def test_mean_pooling_puts_its_head_over_the_pretrained_minilm_encoder(minilm) -> None:
    model, _ = minilm
    assert isinstance(model, BertMeanPoolForSequenceClassification)
    plain = AutoModel.from_pretrained(resolve_base_model(MINILM))
    for name, value in plain.state_dict().items():
        if not name.startswith("pooler."):
            assert torch.equal(model.bert.state_dict()[name], value), name


@torch.no_grad()
def test_padding_does_not_change_the_logits(minilm) -> None:
    """The mean runs over real tokens only: a text alone and padded beside a long one score the same."""
    model, tokenizer = minilm
    short = "can I see you in the kitchen?"
    alone = model(**tokenizer([short], return_tensors="pt")).logits
    padded = tokenizer([short, "a much longer message that forces padding onto the first one " * 3], padding=True)
    both = model(**{k: torch.tensor(v) for k, v in padded.items()}).logits
    assert sum(padded["attention_mask"][0]) < len(padded["attention_mask"][0])
    torch.testing.assert_close(both[0], alone[0], atol=1e-5, rtol=0)


@torch.no_grad()
def test_a_saved_model_reloads_through_the_auto_class_with_its_own_head(minilm, tmp_path: Path) -> None:
    model, tokenizer = minilm
    model.save_pretrained(tmp_path)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(again) is BertMeanPoolForSequenceClassification
    assert again.config.model_type == MEAN_POOL_MODEL_TYPE
    enc = tokenizer(["see you tomorrow", "selfie?"], padding=True, return_tensors="pt")
    torch.testing.assert_close(again(**enc).logits, model(**enc).logits)


def test_mean_pooling_refuses_a_base_that_is_not_bert(tmp_path: Path) -> None:
    BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="BERT-family"):
        load_base(str(tmp_path), pooling="mean")


def test_the_mean_pooled_model_exports_to_onnx_within_the_parity_bound(minilm, tmp_path: Path) -> None:
    """Trace, graph and parity check of the served export path (export/classifier.py) on this head."""
    from export.classifier import MAX_PARITY_ERROR, export_classifier_onnx

    model, tokenizer = minilm
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    exported = export_classifier_onnx(tmp_path / "model", tmp_path / "model.onnx")
    assert exported.max_abs_error <= MAX_PARITY_ERROR
