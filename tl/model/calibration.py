"""--calibrate: temperature scaling (Guo et al. 2017) fitted on the best epoch's val logits, and the
expected calibration error (ECE) before and after.

One temperature T divides every logit: the predicted class never changes, only how sure the model
says it is. It is fitted on val, so the ECE after is measured on the images it was fitted to (an
optimistic figure; a test/ folder gives an independent one).
"""

import math

import torch
import torch.nn.functional as F

from tl.model.evaluation import view_probs

BINS = 15  # equal-width confidence bins, as Guo et al.
# A val set the model gets all right (or all wrong) pushes T towards 0 (or infinity) without end: keep it
# in a range where probabilities stay meaningful, and say so when it ends at a bound.
T_RANGE = (0.05, 20.0)


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The T in T_RANGE that minimizes the val NLL of view_probs(logits, T); logits [N, views, classes].

    A golden-section search on log T: the NLL is convex in 1/T for one view (and unimodal in practice
    for two), and unlike a gradient method the search does not stop early where the NLL of a val set
    the model gets all right flattens out on its way to T = 0."""
    logits = logits.double()

    def nll(log_t: float) -> float:
        return F.nll_loss(view_probs(logits, math.exp(log_t)).clamp_min(1e-300).log(), targets).item()

    low, high = (math.log(t) for t in T_RANGE)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = nll(a), nll(b)
    for _ in range(60):  # the bracket shrinks to 0.618^60 of log(400): far below float precision of T
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = nll(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = nll(b)
    return math.exp((low + high) / 2)


def reliability(probs: torch.Tensor, targets: torch.Tensor, bins: int = BINS) -> dict:
    """Per confidence bin: images, mean confidence, accuracy; and the ECE (their weighted gap)."""
    confidence, preds = probs.double().max(1)
    correct = (preds == targets).double()
    which = (confidence * bins).long().clamp(0, bins - 1)  # confidence 1.0 goes in the top bin
    counts = torch.bincount(which, minlength=bins).double()
    conf = torch.bincount(which, confidence, minlength=bins) / counts.clamp_min(1)
    acc = torch.bincount(which, correct, minlength=bins) / counts.clamp_min(1)
    ece = float(((acc - conf).abs() * counts).sum() / len(targets))
    return {"ece": ece, "counts": counts.long().tolist(), "confidence": conf.tolist(), "accuracy": acc.tolist()}


def calibrate(logits: torch.Tensor, targets: torch.Tensor) -> tuple[dict, dict, dict]:
    """Fit T on val; the summary's figures, and the reliability bins before and after."""
    temperature = fit_temperature(logits, targets)
    before, after = reliability(view_probs(logits, 1.0), targets), reliability(view_probs(logits, temperature), targets)
    nll = [F.nll_loss(view_probs(logits.double(), t).clamp_min(1e-300).log(), targets).item()
           for t in (1.0, temperature)]
    at_bound = any(abs(math.log(temperature / t)) < 1e-3 for t in T_RANGE)
    figures = {"temperature": temperature, "at_bound": at_bound, "fitted_on": "val",
               "val_ece_before": before["ece"],
               "val_ece_after": after["ece"], "val_nll_before": nll[0], "val_nll_after": nll[1]}
    return figures, before, after
