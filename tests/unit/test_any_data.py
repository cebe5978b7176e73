"""Inputs of any shape and dtype, data streamed from map-style datasets, and the errors for data that break the contract."""

import csv
from pathlib import Path

import pytest
import torch
import yaml

from rdml_dist.cli import main
from rdml_dist.config import parse_config
from rdml_dist.data import DataSpec, StreamedSplit, TensorSplit, batch_plan, load_dataset
from rdml_dist.engines.local import train_local
from rdml_dist.errors import ConfigError
from rdml_dist.models import build_model
from tests.unit.data_files import write_imagefolder

DATA = "tests.unit.data_files"
MODELS = "tests.unit.sample_factories"


def test_feature_vectors_reach_the_model_exactly_as_returned() -> None:
    data = load_dataset(DataSpec(f"{DATA}:feature_vectors"), seed=0)
    assert (data.input_shape, data.input_dtype, data.is_image, data.in_channels) == ((12,), torch.float32, False, None)
    (inputs, _), _ = __import__(DATA, fromlist=["x"]).feature_vectors()
    batch, _ = data.train.batch(torch.tensor([3, 1, 4]), augment_seed=7)
    assert torch.equal(batch, inputs[[3, 1, 4]])


def test_token_ids_stay_int64_and_the_transform_hook_alters_training_batches_only() -> None:
    data = load_dataset(DataSpec(f"{DATA}:token_ids", transform=f"{DATA}:flip_tokens"), seed=0)
    assert (data.input_shape, data.input_dtype) == ((10,), torch.int64)
    indices = torch.arange(40)
    raw = data.train.inputs[indices]
    first, _ = data.train.batch(indices, augment_seed=11)
    assert first.dtype == torch.int64 and torch.equal(first, data.train.batch(indices, augment_seed=11)[0])
    flipped = (first != raw).any(dim=1)
    assert 0 < int(flipped.sum()) < 40 and torch.equal(first[flipped], raw[flipped].flip(1))
    assert not torch.equal(first, data.train.batch(indices, augment_seed=12)[0])
    assert torch.equal(data.train.batch(indices)[0], raw)  # unseeded (evaluation) batches are left alone
    assert torch.equal(data.val.batch(torch.arange(10), augment_seed=11)[0], data.val.inputs[:10])


def test_non_square_images_are_normalised_cropped_and_read_by_every_image_model() -> None:
    data = load_dataset(DataSpec(f"{DATA}:non_square_images", augment=True), seed=0)
    assert (data.input_shape, data.in_channels, data.image_size) == ((3, 12, 20), 3, None)
    indices = torch.arange(16)
    plain, _ = data.train.batch(indices)
    augmented, _ = data.train.batch(indices, augment_seed=3)
    assert plain.shape == augmented.shape == (16, 3, 12, 20) and not torch.equal(plain, augmented)
    assert abs(float(data.train.batch(torch.arange(len(data.train)))[0].mean())) < 0.05  # normalised
    for name in ("small_cnn", "resnet20", "mlp", "wrn_16_2"):
        model = build_model(name, num_classes=3, input_shape=data.input_shape)
        assert model(augmented).shape == (16, 3)


def _train_locally(tmp_path: Path, name: str, data: dict, students: list[dict], epochs: int = 2) -> list[dict[str, str]]:
    config = parse_config({
        "name": name,
        "seed": 1,
        "data": data,
        "students": students,
        "training": {"epochs": epochs, "batch_size": 32, "optimizer": {"name": "adam", "lr": 0.01, "weight_decay": 0.0}},
        "runtime": {"engine": "local", "run_dir": str(tmp_path / name), "torch_threads": 1},
        "monitoring": {"port": 0},
    })
    run = train_local(config, config.resolved_run_dir(), show_progress=False)
    run.finish()
    with (Path(run.location) / "steps.csv").open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("data, models", [
    ({"name": f"{DATA}:feature_vectors"}, ["mlp", "mlp"]),
    ({"name": f"{DATA}:token_ids", "transform": f"{DATA}:flip_tokens"}, [f"{MODELS}:token_bag", f"{MODELS}:token_conv"]),
    ({"name": f"{DATA}:non_square_images", "augment": True}, ["small_cnn", "resnet20", "mlp"]),
], ids=["features", "tokens", "non-square-images"])
def test_cohorts_train_on_any_kind_of_input(tmp_path: Path, data: dict, models: list[str]) -> None:
    students = [{"name": f"s{index}", "model": model} for index, model in enumerate(models)]
    rows = _train_locally(tmp_path, "any", data, students)
    assert {row["student"] for row in rows} == {student["name"] for student in students}
    first, last = (sum(float(row["ce_loss"]) for row in rows if row["step"] == step) for step in (rows[0]["step"], rows[-1]["step"]))
    assert last < first  # every kind of input is learnt from


@pytest.mark.parametrize("workers", [0, 2])
def test_a_streamed_map_style_dataset_trains_exactly_like_the_same_tensors(tmp_path: Path, workers: int) -> None:
    students = [{"name": "a", "model": "mlp"}, {"name": "b", "model": "mlp", "options": {"hidden": [32]}}]
    in_memory = _train_locally(tmp_path, "memory", {"name": f"{DATA}:feature_vectors", "label_noise": 0.2}, students)
    streamed = _train_locally(tmp_path, "streamed", {"name": f"{DATA}:streamed_features", "label_noise": 0.2,
                                                     "workers": workers}, students)
    assert len(in_memory) == len(streamed) == 2 * 2 * 10
    for memory_row, streamed_row in zip(in_memory, streamed):
        for column in ("step", "student", "ce_loss", "mimicry_loss", "correct", "correct_clean"):
            assert memory_row[column] == streamed_row[column], column


def test_an_image_folder_streams_only_past_the_memory_limit_and_reads_identical_batches(tmp_path: Path) -> None:
    write_imagefolder(tmp_path, ["a", "b", "c"], per_class=8, size=20)
    fits = load_dataset(DataSpec("imagefolder", root=str(tmp_path), image_size=16, val_fraction=0.25), seed=0)
    assert isinstance(fits.train, TensorSplit)
    spec = DataSpec("imagefolder", root=str(tmp_path), image_size=16, val_fraction=0.25, augment=True, memory_limit_mb=0.01)
    readers = [load_dataset(DataSpec(**{**spec.__dict__, "workers": workers}), seed=0) for workers in (0, 2)]
    assert all(isinstance(reader.train, StreamedSplit) for reader in readers)
    assert readers[0].input_shape == (3, 16, 16) and torch.equal(readers[0].train.labels, fits.train.labels)
    plan = batch_plan(len(readers[0].train), 5, seed=0, epoch=0)
    seeds = [100 + step for step in range(len(plan))]
    first, second = ([inputs for inputs, _ in reader.train.batches(plan, seeds)] for reader in readers)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))  # one process or two workers alike
    other = [inputs for inputs, _ in readers[0].train.batches(plan, [seed + 1 for seed in seeds])]
    assert not torch.equal(first[0], other[0])  # random-resized crops follow the step's seed
    assert first[0].shape == (5, 3, 16, 16)


def _error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("spec, field, message", [
    (DataSpec(f"{DATA}:without_targets"), "data.name", "has no .targets holding its labels"),
    (DataSpec(f"{DATA}:image_items"), "data.name", "train items hold a Image, not a tensor (add a ToTensor transform)"),
    (DataSpec(f"{DATA}:too_few_targets"), "data.name", "the train split has 4 items but 3 targets"),
    (DataSpec(f"{DATA}:token_ids", augment=True), "data.augment", "the built-in crop and flip need images (C, H, W)"),
    (DataSpec("digits", transform="nowhere_at_all:hook"), "data.transform", "cannot import module 'nowhere_at_all'"),
    (DataSpec("digits", transform=f"{DATA}:flip_tokens", augment=True), "data.augment", "data.transform replaces"),
], ids=["no-targets", "not-tensors", "targets-length", "augment-tokens", "transform-import", "transform-and-augment"])
def test_data_that_break_the_contract_name_their_field(spec: DataSpec, field: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_dataset(spec, seed=0)
    assert caught.value.problems[0][0] == field and message in caught.value.problems[0][1]
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("model, field, message", [
    ("small_cnn", "students.1.model", "'small_cnn' is an image model and needs (C, H, W) inputs; the data give torch.int64 inputs of shape (10,)"),
    ("mlp", "students.1.model", "'mlp' needs floating-point inputs; the data give torch.int64 inputs of shape (10,)"),
])
def test_a_model_that_cannot_read_the_data_is_one_line_from_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model: str, field: str, message: str
) -> None:
    config = tmp_path / "tokens.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"name": f"{DATA}:token_ids"},
        "students": [{"model": f"{MODELS}:token_bag"}, {"model": model}],
        "training": {"epochs": 1},
        "runtime": {"engine": "local", "run_dir": str(tmp_path / "run")},
        "monitoring": {"port": 0},
    }))
    assert main(["train", str(config)]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"rdml-dist: invalid config: {field}: {message}"), lines


def test_a_negative_worker_count_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--set", "data.workers=-1"]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("rdml-dist: invalid config: data.workers: "), lines
