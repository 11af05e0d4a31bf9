"""Image classifiers: a registry of architectures (any input size and channel count) plus training and
evaluation. Importing this package registers every built-in architecture."""

from puregen_dist.classifiers import densenet, hlb, mobilenet, resnet, small_cnn  # noqa: F401  (registers)
from puregen_dist.registry import CLASSIFIERS


def build_classifier(name: str, *, in_channels: int, num_classes: int, image_size: int):  # noqa: ANN201
    """Instantiate the registered architecture ``name`` (an ``nn.Module`` mapping (N, C, H, W) to logits)."""
    return CLASSIFIERS.build(name, in_channels=in_channels, num_classes=num_classes, image_size=image_size)


__all__ = ["CLASSIFIERS", "build_classifier"]
