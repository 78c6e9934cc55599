"""--calibrate and --tta: temperature scaling recovers a known temperature and lowers the ECE; a run
reports both beside the plain figures, and tl.predict and tl.export give the same probabilities (--tta crops:
its six views include flip's two, and the exports compute them in their graphs)."""

import json

import pytest
import torch
from conftest import FAST, make_imagefolder, run_cli

from tl.model.calibration import T_RANGE, calibrate, fit_temperature, reliability
from tl.runs import checkpoints


def overconfident(n=4000, classes=5, seed=0):
    """Labels drawn from softmax(z), logits 3z: a model three times too sure of itself."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g) * 1.5
    targets = torch.multinomial(z.softmax(1), 1, generator=g)[:, 0]
    return (3 * z)[:, None, :], targets


def test_fit_recovers_the_temperature_and_lowers_the_ece():
    logits, targets = overconfident()
    assert fit_temperature(logits, targets) == pytest.approx(3.0, rel=0.08)
    figures, before, after = calibrate(logits, targets)
    assert figures["val_ece_after"] < figures["val_ece_before"] / 3
    assert figures["val_nll_after"] < figures["val_nll_before"]
    assert sum(before["counts"]) == sum(after["counts"]) == len(targets)


def test_a_val_set_classified_perfectly_stops_the_temperature_at_its_bound():
    logits = torch.tensor([[[4.0, -4.0]], [[-3.0, 3.0]], [[5.0, 1.0]]])
    figures, _, _ = calibrate(logits, torch.tensor([0, 1, 0]))
    assert figures["temperature"] == pytest.approx(T_RANGE[0]) and figures["at_bound"]
    assert not calibrate(*overconfident())[0]["at_bound"]


def test_ece_by_hand():
    probs = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.45, 0.55]])
    targets = torch.tensor([0, 1, 0, 0])
    # Bin 14 (0.95): 2 images, accuracy 1/2, confidence 0.95; bin 8 (0.55): 2 images, accuracy 1/2, 0.55.
    assert reliability(probs, targets)["ece"] == pytest.approx((2 * 0.45 + 2 * 0.05) / 4)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, base_weights):
    data = make_imagefolder(tmp_path_factory.mktemp("cal") / "d", n_train=12, n_val=8, n_test=5, size=48)
    out = tmp_path_factory.mktemp("cal") / "run"
    proc = run_cli("train.py", "--data-dir", data, "--output-dir", out, "--epochs", "2", *FAST, "--weights",
                   base_weights, "--precision", "no", "--tta", "crops", "--calibrate")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return data, out, proc.stdout


def test_a_run_reports_tta_and_calibration_beside_the_plain_figures(calibrated):
    data, out, stdout = calibrated
    summary = json.loads((out / "summary.json").read_text())
    c = summary["calibration"]
    assert c["temperature"] > 0 and c["fitted_on"] == "val" and c["val_nll_after"] <= c["val_nll_before"] + 1e-9
    assert {"val_ece_before", "val_ece_after", "test_ece_before", "test_ece_after"} <= set(c)
    assert summary["tta"] == "crops" and {"val_acc_tta", "test_acc_tta", "test_acc", "best_val_acc"} <= set(summary)
    assert (out / "reliability.png").stat().st_size > 1000
    meta = checkpoints.read_metadata(out / "best.safetensors")
    assert meta["temperature"] == c["temperature"] and meta["tta_val_acc"] == summary["val_acc_tta"]
    assert "with --tta crops: val acc" in stdout and "calibration: temperature" in stdout


def probabilities_printed(stdout: str) -> dict[str, float]:
    return {line.split("\t")[0].rsplit("/", 2)[-2] + "/" + line.split("\t")[0].rsplit("/", 1)[-1]:
            float(line.split("\t")[2]) for line in stdout.splitlines() if "\t" in line}


def test_predict_and_the_exports_apply_the_crops_and_the_temperature(calibrated, base_weights, tmp_path):
    data, out, _ = calibrated
    summary = json.loads((out / "summary.json").read_text())
    ckpt = run_cli("-m", "tl.predict", "--checkpoint", out / "best.safetensors", data / "val")
    assert ckpt.returncode == 0, ckpt.stderr[-2000:]
    assert f"accuracy {summary['val_acc_tta']:.4f}" in ckpt.stdout
    by_checkpoint = probabilities_printed(ckpt.stdout)
    for kind in ("onnx", "torchscript"):
        export = run_cli("-m", "tl.export", "--checkpoint", out / "best.safetensors", "--format", kind,
                         "--output", tmp_path / f"m.{kind}")
        assert export.returncode == 0 and "exactly the run's best val accuracy" in export.stdout, export.stderr[-2000:]
        exported = run_cli("-m", "tl.predict", "--checkpoint", tmp_path / f"m.{kind}", data / "val")
        assert probabilities_printed(exported.stdout) == pytest.approx(by_checkpoint, abs=2e-4)
    # The temperature is in the numbers: without it (T = 1) the same logits give other probabilities.
    plain = checkpoints.load(out / "best.safetensors")
    tensors, meta = plain
    checkpoints.save(tmp_path / "uncalibrated.safetensors", tensors, {k: v for k, v in meta.items()
                                                                     if k not in ("format", "format_version",
                                                                                  "temperature")})
    uncalibrated = run_cli("-m", "tl.predict", "--checkpoint", tmp_path / "uncalibrated.safetensors", data / "val")
    assert probabilities_printed(uncalibrated.stdout) != pytest.approx(by_checkpoint, abs=1e-3)


def test_tta_views():
    from tl.model.evaluation import tta_views

    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16)
    assert len(tta_views(x)) == 1 and len(tta_views(x, "flip")) == 2
    views = tta_views(x, "crops")
    assert len(views) == 6 and all(v.shape == x.shape for v in views)
    assert torch.equal(views[1], x.flip(-1))
    assert views[2][..., 0, 0].tolist() == x[..., 0, 0].tolist()  # the top-left crop keeps the top-left corner
    assert views[5][..., -1, -1].tolist() == x[..., -1, -1].tolist()  # and the bottom-right one its corner
