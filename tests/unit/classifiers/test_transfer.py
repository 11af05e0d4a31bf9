"""Transfer learning (PUREGEN_REFERENCE §7.3): the pretrained backbone is loaded and the head re-initialised;
linear transfer trains only the head with frozen BatchNorm statistics; fine-tuning trains everything."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import make_imageset
from puregen_dist.classifiers import build_classifier
from puregen_dist.classifiers.training import train_classifier
from puregen_dist.classifiers.transfer import (
    LinearProbe,
    head_name,
    load_pretrained,
    save_classifier,
    transfer_model,
)
from puregen_dist.config.errors import ConfigError
from puregen_dist.config.loading import build
from puregen_dist.config.schema import ClassifierConfig
from puregen_dist.generative.checkpoints import CheckpointError


def _net(name="resnet18", classes=4, seed=0):
    torch.manual_seed(seed)
    return build_classifier(name, in_channels=3, num_classes=classes, image_size=8)


@pytest.fixture
def pretrained(tmp_path):
    net = _net(classes=10, seed=1)
    with torch.no_grad():  # distinctive BatchNorm statistics, to check they are loaded and then kept
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.fill_(0.25)
    return save_classifier(tmp_path / "pre", net, name="resnet18", in_channels=3, num_classes=10,
                           image_size=8), net


def test_backbone_loaded_and_head_reinitialised(pretrained):
    path, source = pretrained
    net = load_pretrained(_net(classes=4), path, name="resnet18", in_channels=3)
    assert head_name(net) == "linear" and net.linear.out_features == 4
    for (key, value), (_, original) in zip(net.state_dict().items(), source.state_dict().items(), strict=True):
        if not key.startswith("linear."):
            assert torch.equal(value, original), key


def _train(model, epochs=1):
    cfg = ClassifierConfig(name="resnet18", epochs=epochs, batch_size=16, lr=0.05, milestones=(), device="cpu",
                           crop_padding=0, flip=False)
    return train_classifier(model, make_imageset(n=32, size=8), cfg, seed=0)


def test_linear_transfer_trains_only_the_head(pretrained):
    path, _ = pretrained
    model = transfer_model(_net(classes=4), "linear", path, name="resnet18", in_channels=3)
    assert isinstance(model, LinearProbe)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    _train(model)
    after = model.net.state_dict()
    changed = sorted({k.split(".")[0] for k in before if not torch.equal(before[k], after[k])})
    assert changed == ["linear"]  # weights AND BatchNorm running statistics of the backbone unchanged
    assert all(not m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_finetune_trains_everything(pretrained):
    path, _ = pretrained
    model = transfer_model(_net(classes=4), "finetune", path, name="resnet18", in_channels=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model)
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], model.state_dict()[k])}
    assert changed == {"stem", "stages", "linear"}


def test_mismatches_are_clear_errors(pretrained, tmp_path):
    path, _ = pretrained
    with pytest.raises(CheckpointError, match="pretrained classifier is 'resnet18'.*classifier.name is 'small_cnn'"):
        load_pretrained(_net("small_cnn"), path, name="small_cnn", in_channels=3)
    with pytest.raises(CheckpointError, match="config.json"):
        load_pretrained(_net(), tmp_path / "missing", name="resnet18", in_channels=3)
    with pytest.raises(ConfigError, match="classifier.pretrained: required for transfer: linear"):
        build(ClassifierConfig, {"transfer": "linear"}, source="x.yaml", path="classifier")
    with pytest.raises(ConfigError, match="only used with transfer"):
        build(ClassifierConfig, {"pretrained": str(path)}, source="x.yaml", path="classifier")
    assert dataclasses.replace(ClassifierConfig(), transfer="finetune", pretrained="p").transfer == "finetune"
