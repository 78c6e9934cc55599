"""--calibrate: temperature scaling (Guo et al. 2017) fitted on the best epoch's val logits, and the
expected calibration error (ECE) before and after.

One temperature T divides every logit: the predicted class never changes, only how sure the model
says it is. It is fitted on val, so the ECE after is measured on the images it was fitted to (an
optimistic figure; a test/ folder gives an independent one).
"""

import torch
import torch.nn.functional as F

from tl.eval import view_probs

BINS = 15  # equal-width confidence bins, as Guo et al.


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The T > 0 that minimizes the val NLL of view_probs(logits, T); logits [N, views, classes]."""
    logits = logits.double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def nll():
        optimizer.zero_grad()
        loss = F.nll_loss(view_probs(logits, log_t.exp()).clamp_min(1e-300).log(), targets)
        loss.backward()
        return loss

    optimizer.step(nll)
    return float(log_t.detach().exp())


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
    figures = {"temperature": temperature, "fitted_on": "val", "val_ece_before": before["ece"],
               "val_ece_after": after["ece"], "val_nll_before": nll[0], "val_nll_after": nll[1]}
    return figures, before, after
