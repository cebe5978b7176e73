"""User model factories referenced as ``tests.unit.sample_factories:<name>`` by the model registry tests."""

from torch import nn


def tiny_model(num_classes: int, image_size: int, hidden: int = 8) -> nn.Module:
    """A two-layer MLP on 1-channel inputs; takes num_classes and image_size but not in_channels."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(image_size * image_size, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
    )


def not_a_module() -> str:
    """A broken factory: returns something that is not an nn.Module."""
    return "not a model"


NOT_CALLABLE = 3
