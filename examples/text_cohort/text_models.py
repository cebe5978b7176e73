"""Three text classifiers of different kinds for one token-id input: fastText, a 1-D CNN, a bag-of-words MLP."""

import torch
import torch.nn.functional as F
from torch import nn

from text_data import PAD


class FastText(nn.Module):
    """Mean of token embeddings, then a linear layer (Joulin et al., 2017)."""

    def __init__(self, num_classes: int, vocab: int = 200, dim: int = 32) -> None:
        super().__init__()
        self.embedding = nn.EmbeddingBag(vocab, dim, mode="mean", padding_idx=PAD)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embedding(tokens))


class TextCNN(nn.Module):
    """Embeddings, a width-3 convolution over positions and max-over-time pooling (Kim, 2014)."""

    def __init__(self, num_classes: int, vocab: int = 200, dim: int = 32, channels: int = 64) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim, padding_idx=PAD)
        self.convolution = nn.Conv1d(dim, channels, kernel_size=3, padding=1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        features = F.relu(self.convolution(self.embedding(tokens).transpose(1, 2)))
        return self.classifier(features.amax(dim=2))


class BagOfWordsMLP(nn.Module):
    """A feature-vector model: token counts over the vocabulary into an MLP."""

    def __init__(self, num_classes: int, vocab: int = 200, hidden: int = 64) -> None:
        super().__init__()
        self.vocab = vocab
        self.body = nn.Sequential(nn.Linear(vocab, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        counts = F.one_hot(tokens, self.vocab).sum(dim=1).float()
        counts[:, PAD] = 0
        return self.body(counts)


def fasttext(num_classes: int, input_dtype: torch.dtype, vocab: int = 200, dim: int = 32) -> nn.Module:
    if input_dtype != torch.int64:
        raise ValueError(f"fasttext reads int64 token ids, not {input_dtype}")
    return FastText(num_classes, vocab, dim)


def text_cnn(num_classes: int, vocab: int = 200, dim: int = 32, channels: int = 64) -> nn.Module:
    return TextCNN(num_classes, vocab, dim, channels)


def bag_of_words_mlp(num_classes: int, vocab: int = 200, hidden: int = 64) -> nn.Module:
    return BagOfWordsMLP(num_classes, vocab, hidden)
