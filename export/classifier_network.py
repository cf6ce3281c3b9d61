"""The classifier's network when its base is a BERT-family sentence encoder: the encoder's token
states, mean-pooled over the real (unpadded) tokens, under a linear 2-way head.

Why not transformers' `BertForSequenceClassification`: it classifies from the [CLS] state through
BERT's pooler layer, but all-MiniLM-L6-v2 (the offline default base) was trained as a sentence
encoder by mean pooling, which does not use that pooler. Mean pooling starts the fine-tune from
the representation that training shaped. Measured over seeds 0-4 it did not beat the [CLS] head
(`training/classifier.py`, the `pooling` setting), so it is an option, not the default.

The class has its own `model_type`, registered with the Auto classes when this module is imported:
a saved model then loads by `AutoModelForSequenceClassification` (the export, the baseline's
`pipeline`) with this head, and code that did not import this module fails loudly ("unrecognized
model type") instead of silently rebuilding a [CLS] head.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig, BertModel, BertPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

MEAN_POOL_MODEL_TYPE = "fluxserve_bert_mean_pool"
MEAN_POOL_BASES: frozenset[str] = frozenset({"bert", MEAN_POOL_MODEL_TYPE})
"""Model types whose weights this network loads (all-MiniLM-L6-v2 is a `bert`)."""


class MeanPoolConfig(BertConfig):
    model_type = MEAN_POOL_MODEL_TYPE


class BertMeanPoolForSequenceClassification(BertPreTrainedModel):
    """BERT encoder -> masked mean of token states -> dropout -> linear head (logits)."""

    config_class = MeanPoolConfig

    def __init__(self, config: MeanPoolConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = torch.nn.Dropout(dropout)
        self.classifier = torch.nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **_: Any,
    ) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        states = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        # clamp: a row of padding only (never sent by our tokenizer) divides by 1, not 0.
        pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


AutoConfig.register(MEAN_POOL_MODEL_TYPE, MeanPoolConfig, exist_ok=True)
AutoModelForSequenceClassification.register(MeanPoolConfig, BertMeanPoolForSequenceClassification, exist_ok=True)
