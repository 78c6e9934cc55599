"""Model: names, weights from the weights API or a file, the new head, the freeze."""

import json
import os
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import run_cli
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from tl.core.errors import UserError
from tl.data.listing import list_images
from tl.data.loaders import ImageSet
from tl.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from tl.data.splits import load_split
from tl.inference.trained import load_model, probabilities
from tl.model.network import build_model, check_input_size, preprocess_for, weights_id
from tl.predict import predict


@pytest.mark.parametrize("name, head", [
    ("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3"), ("efficientnet_b0", "classifier.1"),
    ("vit_b_16", "heads.head"), ("googlenet", "fc"),
])
def test_head_is_replaced_and_feature_extract_freezes_the_rest(name, head):
    model, head_name = build_model(name, "none", 3, "feature-extract")
    assert head_name == head
    assert model.get_submodule(head).out_features == 3
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"{head}.weight", f"{head}.bias"]
    model.eval()
    assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 3)


def test_finetune_trains_everything():
    model, _ = build_model("resnet18", "none", 2, "finetune")
    assert all(p.requires_grad for p in model.parameters())


def test_local_weights_load_exactly(tmp_path):
    torch.manual_seed(1)
    state = torchvision.models.resnet18().state_dict()
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pth")
    for path in (tmp_path / "w.safetensors", tmp_path / "w.pth"):
        model, _ = build_model("resnet18", str(path), 2, "finetune")
        assert torch.equal(model.state_dict()["layer4.1.bn2.running_var"], state["layer4.1.bn2.running_var"])
    assert weights_id(str(tmp_path / "w.pth"), "resnet18").startswith("sha256:")
    assert weights_id("DEFAULT", "resnet18") == "ResNet18_Weights.IMAGENET1K_V1"


class Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/tl-pwned",))


@pytest.mark.parametrize("case, message", [
    ("unknown-model", "unknown model 'resnet1800'"),
    ("missing-file", "does not exist"),
    ("wrong-architecture", "does not fit resnet1800"),
    ("pickle-payload", "refuses to unpickle"),
    ("bad-weights-name", "has no weights named 'IMAGENET9K'"),
    ("no-linear-head", "no nn.Linear final layer"),
    ("bare-tensor", "holds a Tensor, not a state dict"),
    ("a-list", "holds a list, not a state dict"),
    ("training-checkpoint", "save its 'state_dict' entry on its own"),
    ("wrong-shapes", "keys 1 of another shape (fc.weight)"),
])
def test_bad_models_and_weights_are_user_errors(tmp_path, case, message):
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    torch.save({"x": Payload()}, tmp_path / "evil.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    r18 = torchvision.models.resnet18().state_dict()
    torch.save({"state_dict": r18, "epoch": 3}, tmp_path / "ckpt.pth")
    torch.save(r18 | {"fc.weight": torch.zeros(2, 512)}, tmp_path / "shapes.pth")
    name, weights = {
        "unknown-model": ("resnet1800", "none"),
        "missing-file": ("resnet18", str(tmp_path / "nope.pth")),
        "wrong-architecture": ("resnet18", str(tmp_path / "r34.pth")),
        "pickle-payload": ("resnet18", str(tmp_path / "evil.pth")),
        "bad-weights-name": ("resnet18", "IMAGENET9K"),
        "no-linear-head": ("squeezenet1_0", "none"),
        "bare-tensor": ("resnet18", str(tmp_path / "tensor.pth")),
        "a-list": ("resnet18", str(tmp_path / "list.pth")),
        "training-checkpoint": ("resnet18", str(tmp_path / "ckpt.pth")),
        "wrong-shapes": ("resnet18", str(tmp_path / "shapes.pth")),
    }[case]
    with pytest.raises(UserError, match=re.escape(message.replace("resnet1800", name))):
        build_model(name, weights, 2, "finetune")
    assert not os.path.exists("/tmp/tl-pwned")


def test_weights_api_works_offline_from_torch_home_cache(tmp_path, tiny_data):
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), cache / "resnet18-f37072fd.pth")
    env = {"TORCH_HOME": str(tmp_path / "torch"), "https_proxy": "http://127.0.0.1:9"}
    proc = run_cli("train.py", "--weights", "IMAGENET1K_V1", "--data-dir", str(tiny_data), "--epochs", "1",
                   "--image-size", "32", "--output-dir", str(tmp_path / "out"), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = (tmp_path / "out" / "config.json").read_text()
    assert '"base_weights": "ResNet18_Weights.IMAGENET1K_V1"' in config


def test_unreachable_weights_download_names_the_cache_path(tmp_path, tiny_data):
    env = {"TORCH_HOME": str(tmp_path / "torch"), "https_proxy": "http://127.0.0.1:9"}
    proc = run_cli("train.py", "--weights", "DEFAULT", "--data-dir", str(tiny_data), "--epochs", "1",
                   "--output-dir", str(tmp_path / "out"), env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "could not download ResNet18_Weights.IMAGENET1K_V1" in proc.stderr
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in proc.stderr


# --- --preprocess ---

@pytest.mark.parametrize("name,weights,image_size,train_size,expected", [
    ("resnet18", "DEFAULT", 0, 0, (224, 256, 224, "bilinear")),  # the tutorial's own
    ("resnet50", "DEFAULT", 0, 0, (224, 232, 224, "bilinear")),  # IMAGENET1K_V2
    ("efficientnet_b3", "DEFAULT", 0, 0, (300, 320, 300, "bicubic")),
    ("vit_b_16", "IMAGENET1K_SWAG_E2E_V1", 0, 0, (384, 384, 384, "bicubic")),
    ("resnet50", "DEFAULT", 160, 128, (160, 166, 128, "bilinear")),  # the weights' resize ratio at --image-size
])
def test_preprocess_weights_takes_each_entrys_own_transforms(name, weights, image_size, train_size, expected):
    pre, source = preprocess_for("weights", name, weights, None, image_size, train_size)
    assert (pre.crop, pre.resize, pre.train_crop, pre.interpolation) == expected
    assert (pre.mean, pre.std) == (IMAGENET_MEAN, IMAGENET_STD) and "_Weights." in source
    tutorial, _ = preprocess_for("tutorial", name, weights, None, image_size, train_size)
    assert tutorial == Preprocess.tutorial(image_size or 224, train_size)


def test_a_local_file_has_its_entrys_preprocessing_when_named_as_torchvision_names_it(tmp_path):
    named = tmp_path / "efficientnet_b0_rwightman-7f5810bc.pth"  # as torchvision downloads IMAGENET1K_V1
    pre, source = preprocess_for("weights", "efficientnet_b0", str(named), None)
    assert (pre.crop, pre.resize, pre.interpolation) == (224, 256, "bicubic")
    assert source == "preprocessing of EfficientNet_B0_Weights.IMAGENET1K_V1"
    pre, source = preprocess_for("weights", "efficientnet_b0", str(tmp_path / "mine.pth"), None)
    assert pre == Preprocess.tutorial() and source.startswith("note: --preprocess weights: the file mine.pth")
    assert "efficientnet_b0_rwightman-7f5810bc.pth" in source  # says which name would have worked


def test_a_model_that_takes_one_input_size_works_at_it_or_stops_in_one_line(tmp_path, tiny_data):
    check_input_size(torchvision.models.vit_b_16(), "vit_b_16", Preprocess.tutorial(224))  # passes
    proc = run_cli("train.py", "--model", "vit_b_16", "--weights", "none", "--data-dir", str(tiny_data),
                   "--image-size", "64", "--epochs", "1", "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "--model vit_b_16 does not take 64 px images (Wrong image height! Expected 224" \
        in error[0], proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_preprocess_weights_trains_and_evaluates_with_the_weights_own_view(tmp_path, tiny_data):
    """regnet_x_400mf's IMAGENET1K_V2 resizes to 232/224 of the crop, not 256/224: the run's val loss is
    that view's, and tl.predict, which reads the checkpoint's preprocessing, reproduces it."""
    weights = tmp_path / "regnet_x_400mf-62229a5f.pth"  # as torchvision downloads IMAGENET1K_V2
    torch.manual_seed(0)
    torch.save(torchvision.models.regnet_x_400mf().state_dict(), weights)
    out = tmp_path / "out"
    proc = run_cli("train.py", "--mode", "feature-extract", "--model", "regnet_x_400mf", "--weights", str(weights),
                   "--preprocess", "weights", "--image-size", "64", "--precision", "no", "--epochs", "1",
                   "--data-dir", str(tiny_data), "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "64 px val; preprocessing of RegNet_X_400MF_Weights.IMAGENET1K_V2)" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["preprocess"] == "weights" and config["preprocessing"] == {
        "crop": 64, "resize": 66, "train_crop": 64, "interpolation": "bilinear",
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    assert_evaluated_with_its_preprocessing(out, tiny_data, weights, Preprocess.tutorial(64))  # resized to 73


def assert_evaluated_with_its_preprocessing(out, data, weights, other: Preprocess) -> None:
    """The one-epoch run in `out` (--precision no) evaluated with the preprocessing its checkpoint
    records: its val loss is that view's, not `other`'s, and tl.predict reproduces its accuracy."""
    val_loss = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["val_loss"]
    model, meta = load_model(out / "best.safetensors", str(weights))
    samples = list_images(data).val
    targets = torch.tensor([y for _, y in samples])

    def loss(pre):
        loader = DataLoader(ImageSet(load_split(samples, pre, False, False)), batch_size=32)
        return F.nll_loss(probabilities(model, loader, meta | {"preprocessing": pre.meta()}).log(), targets).item()

    assert loss(Preprocess.from_meta(meta)) == pytest.approx(val_loss, abs=1e-5)
    assert abs(loss(other) - val_loss) > 1e-4  # other pixels or statistics: another loss
    assert predict(out / "best.safetensors", [str(data / "val")], str(weights))["accuracy"] == meta["val_acc"]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "timm/test_vit"])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(name):
    """The blocks recomputed in the backward pass (dropout's random draws too): the same loss and gradients,
    the state_dict keys unchanged; in eval mode nothing is recomputed."""
    size = 160 if name.startswith("timm/") else 64
    x, y = torch.rand(4, 3, size, size), torch.tensor([0, 1, 1, 0])
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model, head = build_model(name, "none", 2, "finetune")
        keys = list(model.state_dict())
        if checkpointed:
            from tl.model.network import set_grad_checkpointing

            assert set_grad_checkpointing(model, name, head) != 0
            assert list(model.state_dict()) == keys
        model.train()
        torch.manual_seed(1)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        results.append((loss.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert loss_ckpt == pytest.approx(loss, rel=1e-6) and grads.keys() == grads_ckpt.keys()
    assert all(torch.allclose(grads[k], grads_ckpt[k], rtol=1e-4, atol=1e-6) for k in grads)


def test_grad_checkpointing_refuses_a_model_without_blocks():
    from tl.model.network import set_grad_checkpointing

    model, head = build_model("alexnet", "none", 2, "finetune")
    with pytest.raises(UserError, match="--grad-checkpointing: alexnet has no blocks tl can checkpoint"):
        set_grad_checkpointing(model, "alexnet", head)
