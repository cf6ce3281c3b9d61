"""The prototype's base (facebook/bart-large-mnli) path, on a small random-weight BART built here.

Same code as the hub model takes: load with a 3-way NLI head replaced by our 2-way one, fine-tune,
save, export to ONNX with a bounded parity error.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import BartConfig, BartForSequenceClassification, BartTokenizerFast

from export.classifier import MAX_PARITY_ERROR, export_classifier_onnx
from training.classifier import ClassifierTrainSettings, train_classifier
from training.classifier_data import Splits, load_examples

pytestmark = pytest.mark.slow


def build_tiny_bart_mnli(out: Path) -> Path:
    corpus = [e.text for e in load_examples()]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=600, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>"))
    )
    tokenizer = BartTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=128,
    )
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=tok.get_vocab_size(),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=160,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        num_labels=3,  # like bart-large-mnli's NLI head
        id2label={0: "contradiction", 1: "neutral", 2: "entailment"},
    )
    BartForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_bart_finetune_and_export(tmp_path: Path) -> None:
    base = build_tiny_bart_mnli(tmp_path / "bart-mnli-tiny")
    examples = load_examples()
    splits = Splits(train=examples[:64], validation=examples[64:96], test=examples[96:128])
    settings = ClassifierTrainSettings(base_model=str(base), output_dir=tmp_path / "out", epochs=1, batch_size=16)
    metrics = train_classifier(settings, splits=splits)
    assert {k: metrics["sizes"][k] for k in ("train", "validation", "test")} == {
        "train": 64,
        "validation": 32,
        "test": 32,
    }
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0
    saved = BartForSequenceClassification.from_pretrained(tmp_path / "out")
    assert saved.config.num_labels == 2 and saved.config.id2label[1] == "image_request"
    result = export_classifier_onnx(tmp_path / "out", tmp_path / "onnx" / "model.onnx")
    assert result.max_abs_error < MAX_PARITY_ERROR
