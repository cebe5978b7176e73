"""rdml_dist.data: loading every supported format, label corruption, batch plan, augmentation."""

import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rdml_dist.data import DataSpec, augment_seed, batch_plan, check_data_spec, indices_hash, load_dataset
from rdml_dist.data.cifar import CifarFileError
from rdml_dist.errors import ConfigError
from tests.unit.data_files import write_cifar, write_imagefolder, write_mnist

FACTORIES = "tests.unit.data_files"


def normalized(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """What a batch of uint8 pixels must come back as."""
    scaled = pixels.float() / 255.0
    return (scaled - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


# --- digits ---------------------------------------------------------------------------------


def test_digits_shapes_classes_and_split_sizes() -> None:
    data = load_dataset(DataSpec("digits", val_fraction=0.2), seed=0)
    assert (data.name, data.num_classes, data.in_channels, data.image_size) == ("digits", 10, 1, 8)
    assert len(data.train) + len(data.val) == 1797
    assert abs(len(data.val) - 0.2 * 1797) <= 5  # stratified: rounded per class
    assert set(data.train.labels.tolist()) == set(range(10)) == set(data.val.labels.tolist())
    images, labels = data.train.batch(torch.arange(len(data.train)))
    assert images.shape == (len(data.train), 1, 8, 8) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert abs(float(images.mean())) < 1e-4 and abs(float(images.std()) - 1) < 1e-3
    assert float(data.train.inputs.max()) == 1.0 and float(data.train.inputs.min()) == 0.0


def test_digits_split_is_deterministic_in_seed() -> None:
    first, again, other = (load_dataset(DataSpec("digits"), seed=s) for s in (3, 3, 4))
    assert torch.equal(first.val.inputs, again.val.inputs)
    assert not torch.equal(first.val.inputs, other.val.inputs)


# --- on-disk formats --------------------------------------------------------------------------


@pytest.mark.parametrize("variant, classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_pickles_round_trip(tmp_path: Path, variant: str, classes: int) -> None:
    (train_images, train_labels), (test_images, test_labels) = write_cifar(tmp_path, variant, per_file=4)
    data = load_dataset(DataSpec(variant, root=str(tmp_path)), seed=0)
    assert (data.num_classes, data.in_channels, data.image_size) == (classes, 3, 32)
    assert torch.equal(data.train.inputs, torch.from_numpy(train_images))
    assert data.train.labels.tolist() == train_labels.tolist()
    assert torch.equal(data.val.inputs, torch.from_numpy(test_images))
    assert data.val.labels.tolist() == test_labels.tolist()
    assert data.train.augment and not data.val.augment
    picked = torch.tensor([2, 0])
    images, labels = data.val.batch(picked)
    assert torch.allclose(images, normalized(torch.from_numpy(test_images)[picked], data.val.mean, data.val.std))
    assert labels.tolist() == test_labels[[2, 0]].tolist()


class _Planted:
    """What a crafted pickle carries: unpickling it would create ``marker`` (any code could run instead)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_a_crafted_cifar_file_is_refused_and_runs_nothing(tmp_path: Path, protocol: int) -> None:
    write_cifar(tmp_path, "cifar10", per_file=4)
    marker = tmp_path / "ran"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({"data": _Planted(marker), "labels": [0]}, protocol=protocol))
    with pytest.raises(CifarFileError, match=r"data_batch_3: it names \S+, which no CIFAR file holds; refusing to load it"):
        load_dataset(DataSpec("cifar10", root=str(tmp_path)), seed=0)
    assert not marker.exists()


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_idx_files_round_trip(tmp_path: Path, name: str, folder: str) -> None:
    (train_images, train_labels), (test_images, test_labels) = write_mnist(tmp_path, folder, train=7, test=3)
    data = load_dataset(DataSpec(name, root=str(tmp_path)), seed=0)
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 1, 28)
    assert torch.equal(data.train.inputs[:, 0], torch.from_numpy(train_images))
    assert data.train.labels.tolist() == train_labels.tolist()
    assert torch.equal(data.val.inputs[:, 0], torch.from_numpy(test_images))
    assert data.val.labels.tolist() == test_labels.tolist()
    images, _ = data.train.batch(torch.tensor([5]))
    assert torch.allclose(images, normalized(torch.from_numpy(train_images[5:6])[:, None], data.train.mean, data.train.std))


def test_imagefolder_single_root_is_split_per_class(tmp_path: Path) -> None:
    written = write_imagefolder(tmp_path, ["cat", "ant", "bee"], per_class=5, size=8)
    data = load_dataset(DataSpec("imagefolder", root=str(tmp_path), image_size=8, val_fraction=0.4), seed=0)
    assert (data.num_classes, data.in_channels, data.image_size) == (3, 3, 8)
    assert (len(data.train), len(data.val)) == (9, 6)
    by_label = {label: written[name] for label, name in enumerate(sorted(written))}  # ImageFolder sorts classes
    seen = []
    for split in (data.train, data.val):
        for pixels, label in zip(split.inputs, split.labels.tolist()):
            image = pixels.permute(1, 2, 0).numpy()
            matches = [i for i, candidate in enumerate(by_label[label]) if np.array_equal(candidate, image)]
            assert len(matches) == 1
            seen.append((label, matches[0]))
    assert sorted(seen) == [(label, i) for label in range(3) for i in range(5)]


def test_imagefolder_train_val_folders_and_resize(tmp_path: Path) -> None:
    train = write_imagefolder(tmp_path / "train", ["a", "b"], per_class=3, size=8, seed=1)
    val = write_imagefolder(tmp_path / "val", ["a", "b"], per_class=2, size=8, seed=2)
    data = load_dataset(DataSpec("imagefolder", root=str(tmp_path), image_size=8), seed=0)
    assert torch.equal(data.train.inputs, torch.from_numpy(np.concatenate([train["a"], train["b"]])).permute(0, 3, 1, 2))
    assert data.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(data.val.inputs, torch.from_numpy(np.concatenate([val["a"], val["b"]])).permute(0, 3, 1, 2))
    resized = load_dataset(DataSpec("imagefolder", root=str(tmp_path), image_size=4), seed=0)
    assert resized.train.inputs.shape == (6, 3, 4, 4) and resized.image_size == 4
    assert load_dataset(DataSpec("imagefolder", root=str(tmp_path)), seed=0).image_size == 32


def test_imagefolder_with_different_classes_in_val_is_rejected(tmp_path: Path) -> None:
    write_imagefolder(tmp_path / "train", ["a", "b"], per_class=2, size=4)
    write_imagefolder(tmp_path / "val", ["a", "c"], per_class=2, size=4)
    with pytest.raises(ConfigError, match="classes") as caught:
        load_dataset(DataSpec("imagefolder", root=str(tmp_path)), seed=0)
    assert caught.value.field == "data.root"


# --- validation -----------------------------------------------------------------------------


def test_missing_root_names_field_and_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError) as caught:
        load_dataset(DataSpec("cifar10", root=str(missing)), seed=0)
    assert caught.value.field == "data.root"
    assert str(missing) in str(caught.value) and "data.download: true" in str(caught.value)


def test_root_without_expected_files_names_the_file(tmp_path: Path) -> None:
    write_mnist(tmp_path, "MNIST", train=2, test=2)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ConfigError, match="t10k-labels-idx1-ubyte") as caught:
        check_data_spec(DataSpec("mnist", root=str(tmp_path)), field="cohort.data")
    assert caught.value.field == "cohort.data.root"
    with pytest.raises(ConfigError, match="needs a data folder"):
        check_data_spec(DataSpec("cifar100"))


def test_download_does_not_require_files_but_only_for_downloadable_sets(tmp_path: Path) -> None:
    check_data_spec(DataSpec("cifar10", root=str(tmp_path / "new"), download=True))
    with pytest.raises(ConfigError, match="cannot be downloaded") as caught:
        check_data_spec(DataSpec("imagefolder", root=str(tmp_path), download=True))
    assert caught.value.field == "data.download"


def test_unknown_name_lists_allowed_names() -> None:
    with pytest.raises(ConfigError) as caught:
        check_data_spec(DataSpec("imagenet"))
    assert caught.value.field == "data.name"
    for name in ("digits", "cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder", "package.module:function"):
        assert name in str(caught.value)


@pytest.mark.parametrize(
    "spec, field",
    [
        (DataSpec("digits", val_fraction=0.0), "data.val_fraction"),
        (DataSpec("digits", val_fraction=1.0), "data.val_fraction"),
        (DataSpec("digits", label_noise=-0.1), "data.label_noise"),
        (DataSpec("digits", unlabeled_fraction=1.0), "data.unlabeled_fraction"),
        (DataSpec("digits", image_size=16), "data.image_size"),
        (DataSpec("digits", options={"x": 1}), "data.options"),
        (DataSpec("imagefolder", root=".", image_size=0), "data.image_size"),
    ],
)
def test_out_of_range_values_are_rejected(spec: DataSpec, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_data_spec(spec)
    assert caught.value.field == field


def test_val_fraction_too_small_for_the_data_is_rejected() -> None:
    with pytest.raises(ConfigError, match="empty validation") as caught:
        load_dataset(DataSpec("digits", val_fraction=0.001), seed=0)
    assert caught.value.field == "data.val_fraction"


# --- batch plan and hash --------------------------------------------------------------------


def test_batch_plan_covers_each_index_once_and_is_deterministic() -> None:
    plan = batch_plan(103, 10, seed=7, epoch=0)
    assert [len(b) for b in plan] == [10] * 10 + [3]
    assert sorted(torch.cat(plan).tolist()) == list(range(103))
    assert all(b.dtype == torch.int64 for b in plan)
    assert all(torch.equal(a, b) for a, b in zip(plan, batch_plan(103, 10, seed=7, epoch=0)))
    assert not torch.equal(torch.cat(plan), torch.cat(batch_plan(103, 10, seed=7, epoch=1)))
    assert not torch.equal(torch.cat(plan), torch.cat(batch_plan(103, 10, seed=8, epoch=0)))
    assert [len(b) for b in batch_plan(103, 10, seed=7, epoch=0, drop_last=True)] == [10] * 10
    assert torch.equal(torch.cat(batch_plan(103, 10, seed=7, epoch=0, drop_last=True)), torch.cat(plan)[:100])


def test_batch_plan_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        batch_plan(10, 0, seed=0, epoch=0)


def test_indices_hash_is_short_stable_and_sensitive() -> None:
    indices = torch.tensor([4, 8, 15, 16, 23, 42])
    digest = indices_hash(indices)
    expected = hashlib.blake2b(struct.pack("<6q", 4, 8, 15, 16, 23, 42), digest_size=8).hexdigest()
    assert digest == expected and len(digest) == 16
    assert indices_hash(indices.to(torch.int32)) == digest
    changed = indices.clone()
    changed[3] = 17
    assert indices_hash(changed) != digest
    assert indices_hash(indices.flip(0)) != digest


def test_augment_seed_is_the_documented_hash_and_varies() -> None:
    """Students in other processes and on other platforms derive the same crops and flips: the seed is a blake2b
    hash of ``augment:seed:epoch:step`` (no process state such as Python's salted ``hash``)."""
    recipe = int.from_bytes(hashlib.blake2b(b"augment:1:2:3", digest_size=8).digest(), "little") & (2**63 - 1)
    assert augment_seed(1, 2, 3) == recipe == 5018291674588323140
    assert augment_seed(-1, 0, 10**30) == 4827761866691951108  # any integer, negative or huge
    assert len({augment_seed(1, 2, 3), augment_seed(1, 2, 4), augment_seed(1, 3, 3), augment_seed(2, 2, 3)}) == 4


# --- augmentation ---------------------------------------------------------------------------


def test_augmentation_is_a_seeded_padded_crop_and_flip(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10", per_file=4)
    split = load_dataset(DataSpec("cifar10", root=str(tmp_path)), seed=0).train
    indices = torch.arange(12)
    plain, _ = split.batch(indices)
    first, _ = split.batch(indices, augment_seed=11)
    assert torch.equal(first, split.batch(indices, augment_seed=11)[0])
    assert not torch.equal(first, split.batch(indices, augment_seed=12)[0])
    assert not torch.equal(first, plain)
    zero = normalized(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), split.mean, split.std)
    padded = F.pad(plain - zero, (4, 4, 4, 4)) + zero  # zero padding in pixel space
    placements = []
    for image, source in zip(first, padded):
        windows = {(y, x, flip): source[:, y : y + 32, x : x + 32] for y in range(9) for x in range(9) for flip in (0, 1)}
        found = [key for key, window in windows.items() if torch.allclose(image, window.flip(-1) if key[2] else window, atol=1e-5)]
        assert len(found) == 1
        placements.append(found[0])
    assert {flip for _, _, flip in placements} == {0, 1}  # some flipped, some not
    assert len({(y, x) for y, x, _ in placements}) > 3  # offsets vary per sample
    assert torch.equal(split.batch(indices)[0], plain)  # no seed, no augmentation


def test_augment_override_and_validation_split_stays_plain() -> None:
    data = load_dataset(DataSpec("digits", augment=True), seed=0)
    assert data.train.augment and not data.val.augment
    indices = torch.arange(20)
    assert not torch.equal(data.train.batch(indices, 5)[0], data.train.batch(indices)[0])
    assert torch.equal(data.val.batch(indices, 5)[0], data.val.batch(indices)[0])
    assert not load_dataset(DataSpec("digits"), seed=0).train.augment


# --- label corruption -----------------------------------------------------------------------


def test_label_noise_flips_the_requested_fraction_to_other_classes() -> None:
    data = load_dataset(DataSpec("digits", label_noise=0.3), seed=0)
    train = data.train
    flipped = train.labels != train.clean_labels
    assert int(flipped.sum()) == round(0.3 * len(train))  # exact count: none "flipped" to itself
    assert train.labels.min() >= 0 and train.labels.max() < 10
    assert len(set((train.labels[flipped] - train.clean_labels[flipped]).remainder(10).tolist())) == 9
    assert torch.equal(train.clean_labels, load_dataset(DataSpec("digits"), seed=0).train.labels)
    assert torch.equal(data.val.labels, data.val.clean_labels)
    again = load_dataset(DataSpec("digits", label_noise=0.3), seed=0).train.labels
    other_seed = load_dataset(DataSpec("digits", label_noise=0.3), seed=1).train
    assert torch.equal(again, train.labels)
    assert not torch.equal(other_seed.labels != other_seed.clean_labels, flipped)


def test_unlabeled_fraction_hides_labels_independently_of_noise() -> None:
    hidden_only = load_dataset(DataSpec("digits", unlabeled_fraction=0.25), seed=0).train
    hidden = hidden_only.labels == -1
    assert int(hidden.sum()) == round(0.25 * len(hidden_only))
    assert torch.equal(hidden_only.labels[~hidden], hidden_only.clean_labels[~hidden])
    noisy_only = load_dataset(DataSpec("digits", label_noise=0.3), seed=0).train
    both = load_dataset(DataSpec("digits", label_noise=0.3, unlabeled_fraction=0.25), seed=0).train
    assert torch.equal(both.labels == -1, hidden)
    assert torch.equal(both.labels[~hidden], noisy_only.labels[~hidden])
    assert torch.equal(both.clean_labels, hidden_only.clean_labels)
    overlap = int((hidden & (noisy_only.labels != noisy_only.clean_labels)).sum())
    assert 60 < overlap < 160  # independent picks: about 0.3 * 0.25 * 1438 = 108, not nested


# --- factories ------------------------------------------------------------------------------


def test_tensor_pair_factory_gets_options_and_seed() -> None:
    from tests.unit.data_files import tensor_pair

    spec = DataSpec(f"{FACTORIES}:tensor_pair", options={"count": 60}, label_noise=0.5)
    data = load_dataset(spec, seed=9)
    train, val = tensor_pair(seed=9, count=60)
    assert (data.num_classes, data.in_channels, data.image_size, data.name) == (4, 3, 6, spec.name)
    assert (len(data.train), len(data.val)) == (30, 30)
    assert torch.equal(data.train.inputs, train.tensors[0]) and torch.equal(data.val.inputs, val[0])
    assert torch.equal(data.train.clean_labels, train.tensors[1])
    assert int((data.train.labels != data.train.clean_labels).sum()) == 15
    images, _ = data.train.batch(torch.arange(30))
    assert abs(float(images.mean())) < 1e-4  # uint8 images are normalized with train statistics


def test_float_factory_images_are_used_as_they_are() -> None:
    from tests.unit.data_files import float_images

    data = load_dataset(DataSpec(f"{FACTORIES}:float_images"), seed=0)
    (images, labels), _ = float_images()
    assert data.num_classes == 3
    batch, batch_labels = data.val.batch(torch.arange(12))
    assert torch.equal(batch, images) and torch.equal(batch_labels, labels)


@pytest.mark.parametrize("function, problem", [("wrong_shape", "shape"), ("not_a_pair", "returned a str"), ("missing", "no attribute")])
def test_bad_factories_raise_config_errors(function: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as caught:
        load_dataset(DataSpec(f"{FACTORIES}:{function}"), seed=0)
    assert caught.value.field == "data.name"
