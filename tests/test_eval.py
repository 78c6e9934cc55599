"""The metrics tl.model.evaluation computes from a set's probabilities: confusion, top-5, per-class scores."""

import pytest
import torch

from tl.model.evaluation import class_scores, confusion_matrix, top5_correct


def test_confusion_counts_true_class_by_row():
    confusion = confusion_matrix(torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 1, 1, 2, 0, 2]), 3)
    assert confusion.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_precision_recall_f1_per_class():
    confusion = torch.tensor([[1, 1, 0], [0, 1, 0], [1, 0, 2]])  # as above
    scores = class_scores(confusion, ["a", "b", "c"])
    assert scores["per_class_recall"] == scores["per_class_acc"] == {"a": 1 / 2, "b": 1.0, "c": 2 / 3}
    assert scores["per_class_precision"] == {"a": 1 / 2, "b": 1 / 2, "c": 1.0}
    assert scores["per_class_f1"] == pytest.approx({"a": 1 / 2, "b": 2 / 3, "c": 0.8})
    # A class never predicted and one with no image: 0, not nan.
    empty = class_scores(torch.tensor([[2, 0, 0], [1, 0, 0], [0, 0, 0]]), ["a", "b", "c"], "test_")
    assert empty["test_per_class_precision"] == {"a": 2 / 3, "b": 0.0, "c": 0.0}
    assert empty["test_per_class_f1"]["b"] == empty["test_per_class_recall"]["c"] == 0.0


def test_top5_counts_the_true_class_among_the_five_most_probable():
    probs = torch.arange(7.0).repeat(3, 1).softmax(1)  # every image: class 6 first, then 5, 4, 3, 2
    assert top5_correct(probs, torch.tensor([6, 2, 1])) == 2
    assert top5_correct(probs[:, :5], torch.tensor([0, 1, 2])) is None  # five classes: always 1
