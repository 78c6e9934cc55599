"""--model timm/NAME: timm.create_model, weights from a local file (offline nodes), timm's own head,
head-only checkpoints and tl.predict as for torchvision models."""

import json
import re
import sys

import pytest
import torch
from conftest import make_imagefolder, run_cli
from safetensors.torch import load_file, save_file

from tl.core.config import parse_args
from tl.core.errors import UserError
from tl.inference.trained import load_model
from tl.model.network import build_model, timm_preprocess, weights_id
from tl.predict import predict
from tl.runs import checkpoints
from tl.train.loop import train

timm = pytest.importorskip("timm")

NAME = "test_resnet"  # timm's ~0.5M-parameter test ResNet (BatchNorm, a Linear head named fc), tag r160_in1k
SMALL = ["--image-size", "32", "--batch-size", "4", "--epochs", "2", "--lr", "0.01", "--wandb", "disabled"]


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    """A state dict saved from timm.create_model(NAME) with a fixed seed: the 'downloaded' base."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("timm-weights") / f"{NAME}.safetensors"
    save_file(timm.create_model(NAME).state_dict(), path)
    return path


def train_run(out, data, *options):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    summary, model = train(parse_args(["--model", f"timm/{NAME}", "--data-dir", str(data), "--output-dir", str(out),
                                       *SMALL, *options]))
    return summary, model


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data, timm_weights):
    root = tmp_path_factory.mktemp("timm-runs")
    return {mode: (root / mode, *train_run(root / mode, tiny_data, "--mode", mode, "--weights", str(timm_weights)))
            for mode in ("finetune", "feature-extract")}


def test_feature_extract_checkpoint_is_the_head_and_the_backbone_stays_the_files(runs, timm_weights):
    out, summary, model = runs["feature-extract"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["head"] == "fc" and meta["base_weights"].startswith("sha256:")
    assert sorted(load_file(out / "best.safetensors")) == ["fc.bias", "fc.weight"]
    base = load_file(timm_weights)
    trained = {k: v.cpu() for k, v in model.state_dict().items()}
    assert trained["fc.weight"].shape == (2, base["fc.weight"].shape[1])
    backbone = [k for k in base if not k.startswith("fc.")]
    assert backbone and all(torch.equal(trained[k], base[k]) for k in backbone)  # BatchNorm statistics included


def test_finetune_checkpoint_holds_everything(runs):
    out, _, model = runs["finetune"]
    assert set(load_file(out / "best.safetensors")) == set(model.state_dict())


@pytest.mark.parametrize("mode", ["finetune", "feature-extract"])
def test_predict_command_reproduces_the_best_val_accuracy(runs, tiny_data, timm_weights, mode, capsys):
    """python -m tl.predict --checkpoint RUN/best.safetensors --weights FILE VAL (its main, in this process)."""
    from tl.predict import main

    out, summary, _ = runs[mode]
    main(["--checkpoint", str(out / "best.safetensors"), "--weights", str(timm_weights), str(tiny_data / "val")])
    printed = capsys.readouterr().out
    accuracy = re.search(r"^accuracy \S+ \((\d+)/(\d+)\)$", printed, re.M)
    assert accuracy and int(accuracy.group(1)) / int(accuracy.group(2)) == summary["best_val_acc"]
    # and each image's class and probability, as the run's best epoch recorded them
    state = checkpoints.read_metadata(out / "state.safetensors")
    rows = [line.split("\t") for line in printed.splitlines() if line.count("\t") == 2]
    assert [row[1] for row in rows] == [state["classes"][c] for c in state["best_preds"]]
    assert [float(row[2]) for row in rows] == pytest.approx(state["best_confidence"], abs=2e-4)


def test_default_weights_are_timms_pretrained_tag_and_predict_rebuilds_that_tag(tmp_path, monkeypatch, tiny_data,
                                                                               timm_weights):
    """--weights DEFAULT through timm's own pretrained loading (its cfg pointed at the local file, as a filled
    Hugging Face cache would be read); a head-only checkpoint then needs no --weights."""
    create = timm.create_model
    calls = []

    def from_local_file(name, pretrained=False, **kwargs):
        calls.append((name, pretrained))
        if pretrained:
            kwargs["pretrained_cfg_overlay"] = {"file": str(timm_weights)}
        return create(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", from_local_file)
    summary, _ = train_run(tmp_path / "run", tiny_data, "--mode", "feature-extract", "--weights", "DEFAULT",
                           "--epochs", "1")
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["base_weights"] == weights_id("DEFAULT", f"timm/{NAME}") == f"timm:{NAME}.r160_in1k"
    calls.clear()
    result = predict(tmp_path / "run" / "best.safetensors", [str(tiny_data / "val")])
    assert calls == [(f"{NAME}.r160_in1k", True)]  # the tag the run resolved, whatever timm's default is now
    assert result["accuracy"] == summary["best_val_acc"]
    with pytest.raises(UserError, match="not the base this checkpoint was trained on"):
        load_model(tmp_path / "run" / "best.safetensors", str(timm_weights))


def test_default_weights_offline_are_one_error_line(tmp_path, tiny_data):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an offline node with an empty cache
    proc = run_cli("train.py", "--model", f"timm/{NAME}", "--weights", "DEFAULT", "--data-dir", str(tiny_data),
                   "--output-dir", str(tmp_path / "out"), *SMALL, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert f"could not download timm's pretrained weights {NAME}.r160_in1k" in errors[0]
    assert "--weights /path/" in errors[0] and "HF_HOME" in errors[0]


@pytest.mark.parametrize("name, weights, message", [
    ("timm/test_resnt", "none", "unknown timm model 'test_resnt'; .* such as test_resnet"),
    (f"timm/{NAME}.in9k", "none", f"has no pretrained tag 'in9k'; use one of {NAME}.r160_in1k"),
    (f"timm/{NAME}", "IMAGENET1K_V1", "timm models take --weights DEFAULT"),
    (f"timm/{NAME}", "OTHER", "does not fit timm's test_resnet: "),
    ("test_resnet", "none", "unknown model 'test_resnet'; .* or timm/NAME"),
])
def test_bad_names_and_weights_are_one_line_user_errors(tmp_path, name, weights, message):
    if weights == "OTHER":
        weights = str(tmp_path / "efficientnet.pth")
        torch.save(timm.create_model("test_efficientnet").state_dict(), weights)
    with pytest.raises(UserError, match=message) as e:
        build_model(name, weights, 2, "finetune")
    assert "\n" not in str(e.value)


def test_missing_timm_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(UserError, match=r"needs timm: pip install -e '\.\[timm\]'"):
        build_model(f"timm/{NAME}", "none", 2, "finetune")


@pytest.mark.parametrize("name, head", [("test_efficientnet", "classifier"), ("test_convnext", "head.fc")])
def test_the_head_is_the_module_timm_resets(name, head):
    model, head_name = build_model(f"timm/{name}", "none", 3, "feature-extract")
    assert head_name == head and model.get_classifier() is model.get_submodule(head)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [f"{head}.weight", f"{head}.bias"]
    assert model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 3)


def test_a_conv_head_also_takes_the_feature_caches_rows():
    """dla's classifier is a 1x1 conv followed by a flatten: the feature cache feeds it (N, C) rows."""
    model, head_name = build_model("timm/dla34", "none", 2, "feature-extract")
    head = model.get_submodule(head_name)
    assert head_name == "fc" and isinstance(head, torch.nn.Conv2d) and model.get_classifier() is head
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model.eval()(x)
        model.set_submodule(head_name, torch.nn.Identity())  # what tl.data.features does
        rows = model(x)
    assert rows.shape == (2, head.in_channels) and torch.allclose(head(rows), logits, atol=1e-5)


def test_timm_preprocess_is_timms_data_config():
    assert timm_preprocess(timm.create_model("resnet18")) == {  # resnet18.a1_in1k: bicubic, crop_pct 0.95
        "crop": 224, "resize": 235, "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225)}
    assert timm_preprocess(timm.create_model(NAME)) == {
        "crop": 160, "resize": 168, "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def test_torchvision_models_never_import_timm():
    proc = run_cli("-c", "import sys; from tl.model.network import build_model, weights_id; "
                   "build_model('resnet18', 'none', 2, 'finetune'); weights_id('DEFAULT', 'resnet18'); "
                   "print('timm' in sys.modules)")
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr


def test_preprocess_weights_uses_timms_data_config_in_training_predict_and_export(tmp_path, tiny_data, timm_weights):
    """test_resnet's data config normalizes by mean = std = 0.5 (not ImageNet's) and resizes to 168/160 of
    the crop: the run, tl.predict and the ONNX export all use it."""
    from test_model import assert_evaluated_with_its_preprocessing

    from tl.data.preprocess import Preprocess
    from tl.export import export

    out = tmp_path / "run"
    train_run(out, tiny_data, "--mode", "feature-extract", "--weights", str(timm_weights), "--preprocess", "weights",
              "--precision", "no")
    meta = checkpoints.read_metadata(out / "best.safetensors")
    assert meta["preprocessing"] == {"crop": 32, "resize": 34, "train_crop": 32, "interpolation": "bilinear",
                                     "mean": [0.5] * 3, "std": [0.5] * 3}
    assert_evaluated_with_its_preprocessing(out, tiny_data, timm_weights, Preprocess.tutorial(32))  # ImageNet's
    pytest.importorskip("onnxruntime")
    exported = export(out / "best.safetensors", "onnx", weights=str(timm_weights), val_dir=tiny_data / "val")
    assert exported["meta"]["parity"]["reproduces_best_val_acc"]
    assert (exported["meta"]["mean"], exported["meta"]["resize_size"]) == ([0.5] * 3, 34)


@pytest.mark.parametrize("mode", ["finetune", "feature-extract"])
def test_ten_classes_with_the_weights_preprocessing_in_both_modes(tmp_path, timm_weights, mode):
    data = make_imagefolder(tmp_path / "ten", classes=[f"c{i}" for i in range(10)], n_train=3, n_val=2)
    summary, _ = train_run(tmp_path / "run", data, "--mode", mode, "--weights", str(timm_weights), "--preprocess",
                           "weights")
    assert (summary["num_train"], summary["num_val"]) == (30, 20) and "val_top5" in summary
    assert predict(tmp_path / "run" / "best.safetensors", [str(data / "val")], str(timm_weights))["accuracy"] == \
        summary["best_val_acc"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["finetune", "feature-extract"])
def test_the_real_data_set_at_the_weights_own_size(tmp_path, hymenoptera, timm_weights, mode):
    """No --image-size: test_resnet's own 160 px crops, resized from 168, mean = std = 0.5."""
    out = tmp_path / "run"
    proc = run_cli("train.py", "--mode", mode, "--model", f"timm/{NAME}", "--weights", str(timm_weights),
                   "--preprocess", "weights", "--epochs", "1", "--data-dir", str(hymenoptera), "--output-dir", str(out),
                   "--wandb", "disabled")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"(160 px train crops, 160 px val; preprocessing of timm's data config of {NAME})" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["num_train"], summary["num_val"]) == (244, 153)
    proc = run_cli("-m", "tl.predict", "--checkpoint", str(out / "best.safetensors"), "--weights", str(timm_weights),
                   str(hymenoptera / "val"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == f"accuracy {summary['best_val_acc']:.4f} ({summary['val_correct']}/153)"
