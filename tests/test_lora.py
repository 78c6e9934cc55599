"""--mode lora (tl.model.lora): peft's adapters on torchvision and timm models, their checkpoints (adapters and
head), the commands that read them, and the options that combine with them or are refused."""

import json
import re

import pytest
import torch
from conftest import FAST, make_imagefolder, one_line_error, run_cli
from safetensors.torch import load_file

from tl.core.config import parse_args
from tl.core.errors import UserError
from tl.export import export
from tl.inference.mistakes import errors_report
from tl.inference.trained import load_model
from tl.model.lora import add_adapters, default_targets, resolve_targets
from tl.model.network import build_model
from tl.predict import predict
from tl.runs import checkpoints
from tl.train.loop import train

pytest.importorskip("peft")
timm = pytest.importorskip("timm")

# name: the default targets' short names, how many of each
FAMILIES = {
    "resnet18": {"conv1": 8, "conv2": 8, "downsample.0": 3},
    "vit_b_16": {"self_attention": 12, "mlp.0": 12, "mlp.3": 12},  # nn.MultiheadAttention, adapted whole
    "timm/vit_tiny_patch16_224": {"qkv": 12, "proj": 12, "fc1": 12, "fc2": 12},
    "timm/vit_small_patch16_224": {"qkv": 12, "proj": 12, "fc1": 12, "fc2": 12},
    "timm/convnext_atto": {"fc1": 12, "fc2": 12, "downsample.1": 3},  # not the depthwise convolutions
}


def short(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


@pytest.mark.parametrize("name", FAMILIES)
def test_default_targets_are_the_layers_inside_blocks_and_few_parameters_train(name):
    torch.manual_seed(0)
    model, head = build_model(name, "none", 2, "lora")
    targets = default_targets(model, head)
    counts = {}
    for t in targets:
        counts[short(t)] = counts.get(short(t), 0) + 1
    assert counts == FAMILIES[name]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    add_adapters(model, head, targets, 8, 16)
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains and all(".lora_" in n or n.startswith(head + ".") for n in trains)
    assert any(n.startswith(head + ".") for n in trains)  # the new head trains whole
    share = sum(p.numel() for p in model.parameters() if p.requires_grad) / sum(p.numel() for p in model.parameters())
    if name in ("resnet18", "vit_b_16", "timm/vit_small_patch16_224"):
        assert share < 0.03, share
    # The base's tensors are where they were, under the adapted layers' base_layer
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_a_model_without_blocks_needs_named_targets():
    model, head = build_model("vgg11", "none", 2, "lora")
    with pytest.raises(UserError, match=r"--mode lora: the model has no .* --lora-targets \(candidates: .*features"):
        default_targets(model, head)
    assert resolve_targets(model, head, r"features\.(0|3)") == ["features.0", "features.3"]


def test_targets_by_name_by_last_parts_or_regex_and_an_unmatched_pattern_lists_candidates():
    model, head = build_model("resnet18", "none", 2, "lora")
    assert resolve_targets(model, head, "conv2") == [f"layer{i}.{j}.conv2" for i in range(1, 5) for j in (0, 1)]
    assert resolve_targets(model, head, r"layer4\..*conv.*, layer1.0.conv1") == [
        "layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2", "layer1.0.conv1"]
    assert "conv1" in resolve_targets(model, head, "conv1")  # the stem, when named
    with pytest.raises(UserError, match=r"--lora-targets 'qkv' matches none .* conv1 \(x9\), conv2 \(x8\)"):
        resolve_targets(model, head, "conv2,qkv")
    with pytest.raises(UserError, match="matches none"):
        resolve_targets(model, head, "fc")  # the head trains whole: not a target


@pytest.mark.parametrize("name", ["resnet18", "vit_b_16", "timm/vit_tiny_patch16_224"])
def test_merged_model_is_the_plain_class_and_computes_the_same(name):
    torch.manual_seed(0)
    plain, head = build_model(name, "none", 3, "lora")
    kind, keys = type(plain), set(plain.state_dict())
    tuner = add_adapters(plain, head, default_targets(plain, head), 4, 8)
    with torch.no_grad():
        for n, p in plain.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.02)  # peft starts B at 0: give the adapters something to merge
    x = torch.randn(2, 3, 224, 224) if "vit" in name else torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        apart = plain.eval()(x)
        merged = tuner.merge_and_unload().eval()
        together = merged(x)
    assert type(merged) is kind and set(merged.state_dict()) == keys
    assert (apart - together).abs().max() < 1e-4 * apart.abs().max().clamp(min=1)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_data, base_weights):
    out = tmp_path_factory.mktemp("lora") / "run"
    summary, model = train(parse_args(["--mode", "lora", "--data-dir", str(tiny_data), "--output-dir", str(out),
                                       "--weights", str(base_weights), *FAST, "--epochs", "2", "--lr", "0.01",
                                       "--wandb", "disabled"]))
    return out, summary, model


def test_checkpoint_holds_the_adapters_and_head_and_the_base_is_the_weights_file(lora_run, base_weights):
    out, _, model = lora_run
    best = load_file(out / "best.safetensors")
    assert set(best) == {k for k in model.state_dict() if ".lora_" in k or k.startswith("fc.")}
    assert len([k for k in best if ".lora_A." in k]) == 19 and {"fc.weight", "fc.bias"} <= set(best)
    state, _, _, meta = checkpoints.load_state(out / "state.safetensors")
    assert set(state) == set(best)
    identity = checkpoints.identity_of(out, meta)
    assert identity.mode == "lora" and identity.base_weights.startswith("sha256:")
    assert {identity.recipe[k] for k in ("lora_rank", "lora_alpha", "lora_targets")} == {8, 16.0, ""}
    # a small fraction of a whole model's bytes, and the frozen base (BatchNorm statistics too) unchanged
    base = torch.load(base_weights, weights_only=True)
    assert (out / "best.safetensors").stat().st_size < 0.05 * sum(v.numel() * 4 for v in base.values())
    trained = {k.replace(".base_layer", ""): v.cpu() for k, v in model.state_dict().items() if ".lora_" not in k}
    assert all(torch.equal(trained[k], base[k]) for k in base if not k.startswith("fc."))
    config = json.loads((out / "config.json").read_text())
    assert [g["name"] for g in config["param_groups"]] == ["head", "backbone"]


def test_predict_report_and_export_rebuild_the_run(lora_run, tiny_data, base_weights, tmp_path, capsys):
    out, summary, _ = lora_run
    result = predict(out / "best.safetensors", [str(tiny_data / "val")])  # the recorded base file, found
    assert result["accuracy"] == summary["best_val_acc"]
    report = errors_report(str(out), out=str(tmp_path / "errors"))
    assert (tmp_path / "errors" / "errors.json").is_file() and report["images"] == 12
    exported = export(out / "best.safetensors", "onnx", tmp_path / "m.onnx")
    assert exported["meta"]["parity"]["reproduces_best_val_acc"]
    import onnx

    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert not [i.name for i in graph.initializer if "lora" in i.name]  # merged: a plain ResNet
    apart, _ = load_model(out / "best.safetensors")
    merged, _ = load_model(out / "best.safetensors", merged=True)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert (apart(x) - merged(x)).abs().max() < 1e-4
    other = tmp_path / "other.pth"
    torch.manual_seed(1)
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), other)
    with pytest.raises(UserError, match="is not the base this checkpoint was trained on"):
        load_model(out / "best.safetensors", str(other))


def test_resume_refuses_other_lora_options_and_touches_nothing(lora_run, tiny_data, base_weights):
    out, _, _ = lora_run
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    common = ["train.py", "--mode", "lora", "--data-dir", tiny_data, "--output-dir", out, "--weights", base_weights,
              *FAST, "--epochs", "3", "--lr", "0.01", "--resume"]
    for extra, named in ((["--lora-rank", "16"], "--lora-rank (16, not 8)"),
                         (["--lora-targets", "conv2"], "--lora-targets ('conv2', not '')"),
                         (["--layer-decay", "0.5"], "--layer-decay (0.5, not 1.0)")):
        one_line_error(run_cli(*common, *extra), "cannot resume", named)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_lr_find_runs_on_lora(tmp_path, tiny_data, base_weights):
    proc = run_cli("-m", "tl.lr_find", "--data-dir", tiny_data, "--mode", "lora", "--weights", base_weights, *FAST,
                   "--steps", "12", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "lr find: lora resnet18" in proc.stdout and (tmp_path / "lr_find.png").is_file()


@pytest.mark.parametrize("args, message", [
    (["--lora-rank", "0"], "--lora-rank must be 1 or more"),
    (["--lora-alpha", "0"], "--lora-alpha must be above 0"),
    (["--feature-cache", "on"], "--feature-cache on: lora trains adapters inside the backbone"),
    (["--freeze-epochs", "2"], "--freeze-epochs is for --mode finetune"),
    (["--mode", "finetune", "--lora-rank", "4"], "--lora-rank is for --mode lora"),
    (["--mode", "feature-extract", "--lora-targets", "qkv"], "--lora-targets is for --mode lora"),
])
def test_bad_lora_options_are_one_line_errors(args, message):
    with pytest.raises(UserError, match=re.escape(message)):
        parse_args(["--mode", "lora", *args])


def test_a_config_file_may_list_the_targets(tmp_path):
    (tmp_path / "c.yaml").write_text("mode: lora\nlora_targets: [qkv, 'blocks\\.1\\..*']\n")
    assert parse_args(["--config", str(tmp_path / "c.yaml")]).lora_targets == r"qkv,blocks\.1\..*"


def test_a_config_files_feature_cache_is_refused_too_but_not_the_default(tmp_path):
    (tmp_path / "c.yaml").write_text("mode: lora\nfeature_cache: on\n")
    with pytest.raises(UserError, match="--feature-cache on: lora"):
        parse_args(["--config", str(tmp_path / "c.yaml")])
    assert parse_args(["--mode", "lora"]).feature_cache == "on"  # the default: no cache is built for lora


def test_an_unmatched_target_is_one_line_and_writes_nothing(tmp_path, tiny_data):
    out = tmp_path / "run"
    proc = run_cli("train.py", "--mode", "lora", "--lora-targets", "attn.qkv", "--data-dir", tiny_data,
                   "--output-dir", out, "--weights", "none", *FAST, "--epochs", "1")
    one_line_error(proc, "--lora-targets 'attn.qkv' matches none", "conv1 (x9)")
    assert not out.exists() or not any(out.iterdir())


@pytest.fixture(scope="module")
def few(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("few") / "d", n_train=4, n_val=2, size=64)


TOGETHER = ["--layer-decay", "0.8", "--accumulate", "2", "--grad-checkpointing", "--ema", "0.9"]


@pytest.mark.slow
@pytest.mark.parametrize("name, size, options", [
    ("timm/vit_tiny_patch16_224", 224, []), ("timm/convnext_atto", 64, []),
    ("timm/vit_tiny_patch16_224", 224, TOGETHER), ("timm/vit_small_patch16_224", 224, TOGETHER),
    ("timm/convnext_atto", 64, TOGETHER), ("vit_b_16", 224, TOGETHER)])
def test_lora_alone_and_with_every_large_model_option_on_each_family(tmp_path, few, name, size, options):
    """Random weights, LoRA alone and with --layer-decay + --accumulate + --grad-checkpointing + --ema: the run
    trains, its checkpoint is adapters and head, and load_model rebuilds the model it trained."""
    out = tmp_path / "run"
    summary, model = train(parse_args([
        "--mode", "lora", "--model", name, "--weights", "none", "--data-dir", str(few), "--output-dir", str(out),
        "--image-size", str(size), "--batch-size", "2", "--epochs", "1", "--precision", "no", "--lr", "0.01",
        *options, "--wandb", "disabled"]))
    config = json.loads((out / "config.json").read_text())
    layers = [g["name"] for g in config["param_groups"]]
    if options:
        assert layers[0] == "head" and len(layers) > 3 and all(g.startswith("layer") for g in layers[1:])
    else:
        assert layers == ["head", "backbone"]
    best = load_file(out / "best.safetensors")
    head = checkpoints.read_metadata(out / "best.safetensors")["head"]
    assert best and all(".lora_" in k or k.startswith(head + ".") for k in best)
    rebuilt, meta = load_model(out / "best.safetensors")
    weights_from = meta.get("weights_from", "model")
    if weights_from == "model":  # the in-memory model is the one best.safetensors holds
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            assert (rebuilt(x) - model.cpu().eval()(x)).abs().max() < 1e-5
