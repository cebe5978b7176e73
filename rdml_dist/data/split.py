"""In-memory splits that hand out prepared batches by index, and the Dataset that pairs two of them.

Inputs may have any per-sample shape and dtype. Images are ``(N, C, H, W)`` (uint8 in 0..255,
scaled to [0, 1] per batch, or float): they get per-channel normalisation and, on training
batches, the built-in crop and flip. Anything else (int64 token ids, float feature vectors)
reaches the model exactly as given. A batch transform hook may replace the built-in
augmentation for any kind of input.
"""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from rdml_dist.data.augment import crop_and_flip

Stats = tuple[tuple[float, ...], tuple[float, ...]]  # per-channel (mean, std) on the [0, 1] scale
BatchTransform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]


def is_image_batch(inputs: torch.Tensor) -> bool:
    """(N, C, H, W) of uint8 or floats: what normalisation and crop/flip apply to."""
    return inputs.dim() == 4 and (inputs.dtype == torch.uint8 or inputs.dtype.is_floating_point)


def apply_transform(transform: BatchTransform | None, inputs: torch.Tensor, seed: int | None) -> torch.Tensor:
    """The user's batch hook on a training batch, drawing from a generator every student seeds alike."""
    if transform is None or seed is None:
        return inputs
    return transform(inputs, torch.Generator().manual_seed(seed))


class Split(Protocol):
    """What a student needs from a split, whether it sits in memory or is read from a Dataset."""

    labels: torch.Tensor  # training targets (int64, -1 = hidden, possibly noisy)
    clean_labels: torch.Tensor  # the true labels, so accuracy against them can be reported

    def __len__(self) -> int: ...

    def batches(self, plan: Sequence[torch.Tensor], seeds: Sequence[int | None], pin_memory: bool = False) -> Iterator[Batch]:
        """(inputs, labels) for each index batch of ``plan``, augmented by its seed (None: not augmented)."""
        ...

    def sample(self, positions: torch.Tensor) -> torch.Tensor:
        """Raw, unaugmented inputs at ``positions`` (the data fingerprint reads them)."""
        ...

    def example(self) -> torch.Tensor:
        """The first sample as a model receives it, unaugmented (its shape and dtype describe the data)."""
        ...


@dataclass(frozen=True)
class TensorSplit:
    """One split held in memory as an ``(N, ...)`` input tensor.

    ``mean``/``std`` (images only) are per-channel constants on the [0, 1] scale; ``augment``
    turns on the built-in crop and flip for seeded (training) batches; ``transform`` replaces it.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    clean_labels: torch.Tensor
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    augment: bool = False
    transform: BatchTransform | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: torch.Tensor, augment_seed: int | None = None) -> Batch:
        """Prepared inputs and int64 labels for ``indices``.

        Images come back as normalized float32; with ``augment`` on and an ``augment_seed``
        given they get a random crop (zero padding of 1/8 of the shorter side) and flip decided
        by the seed alone. Other inputs come back as stored.
        """
        inputs = self.inputs[indices]
        if is_image_batch(inputs):
            inputs = self._prepare_images(inputs, augment_seed)
        return apply_transform(self.transform, inputs, augment_seed), self.labels[indices]

    def _prepare_images(self, pixels: torch.Tensor, augment_seed: int | None) -> torch.Tensor:
        images = pixels.float()
        if pixels.dtype == torch.uint8:
            images = images / 255.0
        if self.augment and self.transform is None and augment_seed is not None:
            images = crop_and_flip(images, augment_seed, padding=max(1, min(images.shape[-2:]) // 8))
        if self.mean is None or self.std is None:
            return images
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return (images - mean) / std

    def batches(self, plan: Sequence[torch.Tensor], seeds: Sequence[int | None], pin_memory: bool = False) -> Iterator[Batch]:
        """Lazily, one :meth:`batch` per planned index batch (memory needs no prefetching)."""
        for indices, seed in zip(plan, seeds, strict=True):
            yield self.batch(indices, seed)

    def sample(self, positions: torch.Tensor) -> torch.Tensor:
        return self.inputs[positions]

    def example(self) -> torch.Tensor:
        return self.batch(torch.tensor([0]))[0][0]


@dataclass(frozen=True)
class Dataset:
    """A train and a validation split plus what a model needs to know about its inputs.

    ``input_shape`` and ``input_dtype`` describe one sample as the model receives it (after
    scaling uint8 images to floats); ``is_image`` says whether it is a ``(C, H, W)`` image.
    """

    train: Split
    val: Split
    num_classes: int
    input_shape: tuple[int, ...]
    input_dtype: torch.dtype
    name: str

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3 and self.input_dtype.is_floating_point

    @property
    def in_channels(self) -> int | None:
        """Image channels (None for other inputs)."""
        return self.input_shape[0] if self.is_image else None

    @property
    def image_size(self) -> int | None:
        """The side of square images (None for other inputs and non-square images)."""
        return self.input_shape[1] if self.is_image and self.input_shape[1] == self.input_shape[2] else None


def make_split(inputs: torch.Tensor, labels: torch.Tensor, stats: Stats | None = None, augment: bool = False) -> TensorSplit:
    """A split whose clean labels are its labels (corruption comes later, on train only)."""
    labels = labels.to(torch.int64)
    mean, std = stats if stats is not None else (None, None)
    return TensorSplit(inputs=inputs, labels=labels, clean_labels=labels, mean=mean, std=std, augment=augment)


def model_input(split: Split) -> tuple[tuple[int, ...], torch.dtype]:
    """Per-sample shape and dtype of what a model receives from ``split`` (one prepared sample)."""
    example = split.example()
    return tuple(example.shape), example.dtype


def channel_stats(pixels: torch.Tensor) -> Stats:
    """Per-channel mean and std on the [0, 1] scale, for sets without published constants.

    uint8 pixels go through a 256-bin histogram per channel, so a large image folder never
    needs a float copy of itself.
    """
    means: list[float] = []
    stds: list[float] = []
    for channel in range(pixels.shape[1]):
        plane = pixels[:, channel]
        if pixels.dtype == torch.uint8:
            counts = torch.bincount(plane.flatten(), minlength=256).double()
            levels = torch.arange(256, dtype=torch.float64) / 255.0
            mean = float((counts * levels).sum() / counts.sum())
            variance = float((counts * (levels - mean) ** 2).sum() / counts.sum())
        else:
            mean = float(plane.double().mean())
            variance = float(plane.double().var(correction=0))
        means.append(mean)
        stds.append(variance**0.5 if variance > 0 else 1.0)
    return tuple(means), tuple(stds)
