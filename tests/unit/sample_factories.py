"""User model factories referenced as ``tests.unit.sample_factories:<name>`` by the model registry tests."""

from torch import Tensor, nn


def tiny_model(num_classes: int, image_size: int, hidden: int = 8) -> nn.Module:
    """A two-layer MLP on 1-channel inputs; takes num_classes and image_size but not in_channels."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(image_size * image_size, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
    )


def not_a_module() -> str:
    """A broken factory: returns something that is not an nn.Module."""
    return "not a model"


NOT_CALLABLE = 3


class DivergesOnce(nn.Module):
    """An MLP whose ``diverge_at``-th training forward returns NaN logits, as a blown-up step would.

    The forward counter is process state, not a weight, so after the student restores its
    checkpoint the same step trains normally: the recovery itself is what is under test.
    """

    def __init__(self, num_classes: int, image_size: int, diverge_at: int) -> None:
        super().__init__()
        self.body = tiny_model(num_classes, image_size, hidden=16)
        self.diverge_at = diverge_at
        self.training_forwards = 0

    def forward(self, images: Tensor) -> Tensor:
        logits = self.body(images)
        if self.training:
            self.training_forwards += 1
            if self.training_forwards == self.diverge_at:
                return logits * float("nan")
        return logits


def diverges_once(num_classes: int, image_size: int, diverge_at: int = 3) -> nn.Module:
    return DivergesOnce(num_classes, image_size, diverge_at)


def token_bag(num_classes: int, input_shape: tuple[int, ...], vocab: int = 30, dim: int = 8) -> nn.Module:
    """A fastText-style classifier of (L,) int64 token ids: mean embedding, then linear."""
    if len(input_shape) != 1:
        raise ValueError(f"token_bag reads (L,) token ids, not {input_shape}")
    return nn.Sequential(nn.EmbeddingBag(vocab, dim, mode="mean"), nn.Linear(dim, num_classes))


def token_conv(num_classes: int, vocab: int = 30, dim: int = 8, channels: int = 16) -> nn.Module:
    """A CNN-style classifier of token ids: embedding, width-3 convolution over positions, max over time."""

    class TokenConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(vocab, dim)
            self.convolution = nn.Conv1d(dim, channels, 3, padding=1)
            self.classifier = nn.Linear(channels, num_classes)

        def forward(self, tokens: Tensor) -> Tensor:
            return self.classifier(self.convolution(self.embedding(tokens).transpose(1, 2)).relu().amax(2))

    return TokenConv()
