"""Early stopping in the classifier fine-tuning: epochs stop once `patience` of them in a row do not
beat the best validation accuracy, the best epoch's weights are the ones kept, and the epochs that
do run follow the full run's learning-rate schedule."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from training import classifier
from training.classifier import ClassifierTrainSettings, _fit, load_base
from training.classifier_data import Example, Splits


@pytest.fixture(scope="module")
def base() -> tuple[torch.nn.Module, object]:
    return load_base(classifier.MINILM)


def _splits() -> Splits:
    texts = [("make an image of you in Paris", "image_request"), ("see you tomorrow", "conversation")]
    train = [Example(t, label, "") for t, label in texts * 2]
    return Splits(train, train[:2], train[:2])


@pytest.mark.parametrize(
    ("accuracies", "patience", "ran", "best"),
    [
        ([0.5, 0.9, 0.8, 0.8, 0.95, 0.7], 2, 4, 2),  # two epochs without beating 0.9: stop after epoch 4
        ([0.5, 0.9, 0.8, 0.8, 0.95, 0.7], 3, 6, 5),  # a longer patience reaches the later best
        ([0.5, 0.9, 0.9, 0.9, 0.9, 0.9], 0, 6, 2),  # 0 runs every epoch; a tie is not better
    ],
)
def test_fit_stops_after_patience_and_keeps_the_best_epoch(
    accuracies: list[float],
    patience: int,
    ran: int,
    best: int,
    base: tuple[torch.nn.Module, object],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    model, tokenizer = copy.deepcopy(base[0]), base[1]
    seen: list[int] = []
    states: dict[int, torch.Tensor] = {}
    lrs: list[float] = []

    def scripted(model, tokenizer, examples, max_tokens, normalize):  # noqa: ARG001
        epoch = len(seen) + 1
        seen.append(epoch)
        states[epoch] = model.classifier.weight.detach().clone()
        return {"accuracy": accuracies[epoch - 1]}, None, None

    monkeypatch.setattr(classifier, "_evaluate", scripted)
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    settings = ClassifierTrainSettings(epochs=6, patience=patience, batch_size=4, output_dir=tmp_path)
    assert _fit(model, tokenizer, _splits(), settings, None, None, None) == best
    assert seen == list(range(1, ran + 1))
    assert torch.equal(model.classifier.weight, states[best])  # the best epoch's weights, not the last
    # The schedule spans all 6 epochs (one step each), however many run.
    full = 6
    assert len(lrs) == ran and lrs[-1] > settings.learning_rate * (full - len(lrs)) / full * 0.99
