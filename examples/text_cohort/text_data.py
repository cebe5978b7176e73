"""Generated token-id data for a 4-class text task, and a token-dropout augmentation.

Each sequence is random filler tokens with a few keywords of its class planted at random
positions, so a bag-of-words model and a convolutional model can both learn it.
"""

import torch

PAD = 0


def keyword_sequences(samples: int = 2000, length: int = 24, vocab: int = 200, classes: int = 4,
                      keywords_per_class: int = 8, planted: int = 3, seed: int = 0):
    """(train, val) pairs of (token ids (N, length) int64, labels (N,)), 80/20, reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (samples,), generator=generator)
    tokens = torch.randint(1 + classes * keywords_per_class, vocab, (samples, length), generator=generator)
    keywords = 1 + labels[:, None] * keywords_per_class + torch.randint(0, keywords_per_class, (samples, planted), generator=generator)
    positions = torch.rand(samples, length, generator=generator).argsort(dim=1)[:, :planted]
    tokens.scatter_(1, positions, keywords)
    cut = samples * 4 // 5
    return (tokens[:cut], labels[:cut]), (tokens[cut:], labels[cut:])


def token_dropout(tokens: torch.Tensor, generator: torch.Generator, rate: float = 0.1) -> torch.Tensor:
    """Replace a ``rate`` of the tokens by padding, drawing only from ``generator`` (the same in every student)."""
    dropped = torch.rand(tokens.shape, generator=generator) < rate
    return tokens.masked_fill(dropped, PAD)
