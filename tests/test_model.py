"""Model: names, weights from the weights API or a file, the new head, the freeze."""

import os

import pytest
import torch
import torchvision
from conftest import run_cli
from safetensors.torch import save_file

from tl.errors import UserError
from tl.model import build_model, weights_id


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
])
def test_bad_models_and_weights_are_user_errors(tmp_path, case, message):
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    torch.save({"x": Payload()}, tmp_path / "evil.pth")
    name, weights = {
        "unknown-model": ("resnet1800", "none"),
        "missing-file": ("resnet18", str(tmp_path / "nope.pth")),
        "wrong-architecture": ("resnet18", str(tmp_path / "r34.pth")),
        "pickle-payload": ("resnet18", str(tmp_path / "evil.pth")),
        "bad-weights-name": ("resnet18", "IMAGENET9K"),
        "no-linear-head": ("squeezenet1_0", "none"),
    }[case]
    with pytest.raises(UserError, match=message.replace("resnet1800", name)):
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
