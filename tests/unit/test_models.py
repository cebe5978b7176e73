"""Model registry: shapes, parameter counts, options, user factories and errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rdml_dist.divergence import renyi_divergence
from rdml_dist.errors import ConfigError
from rdml_dist.models import MODEL_NAMES, build_model, check_model_name

FACTORIES = "tests.unit.sample_factories"
SMALL_INPUTS = [(1, 8), (1, 28)]  # (in_channels, image_size)
EXPECTED_NAMES = {
    "mlp", "small_cnn", "resnet20", "resnet32", "resnet56", "resnet18", "mobilenetv2",
    "wrn_16_2", "wrn_28_2", "wrn_28_4", "wrn_28_10", "wrn_40_2",
}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def logits_for(name: str, in_channels: int, image_size: int, num_classes: int = 10, **options: object) -> torch.Tensor:
    torch.manual_seed(0)
    model = build_model(
        name, num_classes=num_classes, input_shape=(in_channels, image_size, image_size), options=options
    )
    return model(torch.randn(2, in_channels, image_size, image_size))


def test_registry_names_are_sorted_and_complete() -> None:
    assert list(MODEL_NAMES) == sorted(MODEL_NAMES)
    assert set(MODEL_NAMES) == EXPECTED_NAMES


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n != "wrn_28_10"])
def test_cifar_sized_input_gives_logits(name: str) -> None:
    logits = logits_for(name, in_channels=3, image_size=32, num_classes=7)
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("in_channels,image_size", SMALL_INPUTS)
@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n != "wrn_28_10"])
def test_grayscale_small_inputs_give_logits(name: str, in_channels: int, image_size: int) -> None:
    logits = logits_for(name, in_channels=in_channels, image_size=image_size)
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()


def test_wrn_28_10_builds_once_with_paper_size() -> None:
    model = build_model("wrn_28_10", num_classes=10, input_shape=(3, 32, 32))
    assert count_parameters(model) == pytest.approx(36.5e6, rel=0.05)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize(
    "name,paper_count",
    [("resnet20", 0.27e6), ("resnet32", 0.46e6), ("resnet56", 0.85e6), ("wrn_16_2", 0.69e6),
     ("wrn_28_2", 1.47e6), ("wrn_40_2", 2.2e6)],
)
def test_parameter_counts_match_papers(name: str, paper_count: float) -> None:
    model = build_model(name, num_classes=10, input_shape=(3, 32, 32))
    assert count_parameters(model) == pytest.approx(paper_count, rel=0.05)


def test_construction_is_deterministic_given_seed() -> None:
    def weights(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        return list(build_model("resnet20", num_classes=10, input_shape=(3, 32, 32)).state_dict().values())

    first, again, other = weights(1), weights(1), weights(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_options_reach_the_constructor() -> None:
    mlp = build_model("mlp", num_classes=4, input_shape=(1, 8, 8), options={"hidden": [16], "dropout": 0.5})
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 16), (16, 4)]
    assert any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in mlp.modules())

    narrow = build_model("small_cnn", num_classes=10, input_shape=(1, 8, 8), options={"width": 8})
    wide = build_model("small_cnn", num_classes=10, input_shape=(1, 8, 8))
    assert count_parameters(narrow) < count_parameters(wide)

    wrn = build_model("wrn_16_2", num_classes=10, input_shape=(3, 32, 32), options={"dropout": 0.3})
    assert any(isinstance(m, nn.Dropout) and m.p == 0.3 for m in wrn.modules())


def test_unknown_name_lists_field_and_allowed_names() -> None:
    with pytest.raises(ConfigError) as caught:
        build_model("resnet33", num_classes=10, input_shape=(3, 32, 32), field="students[2].model")
    message = str(caught.value)
    assert caught.value.field == "students[2].model"
    assert message.startswith("students[2].model: unknown model 'resnet33'")
    assert all(name in message for name in MODEL_NAMES)
    assert "package.module:function" in message


@pytest.mark.parametrize(
    "name,options,field,fragment",
    [
        ("mlp", {"bogus": 1}, "students.0.options.bogus", "unknown option 'bogus'"),
        ("resnet20", {"depth": 32}, "students.0.options.depth", "unknown option 'depth'"),
        ("small_cnn", {"num_classes": 5}, "students.0.options.num_classes", "set by the cohort config"),
        ("mlp", {"hidden": "wide"}, "students.0.model", "hidden must be a list of positive integers"),
        ("wrn_28_2", {"dropout": 1.5}, "students.0.model", "cannot build model 'wrn_28_2'"),
    ],
)
def test_bad_option_is_config_error(name: str, options: dict[str, object], field: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_model(name, num_classes=10, input_shape=(3, 32, 32), options=options, field="students.0.model")
    assert caught.value.field == field
    assert fragment in str(caught.value)


def test_user_factory_gets_accepted_context_and_options() -> None:
    model = build_model(f"{FACTORIES}:tiny_model", num_classes=3, input_shape=(1, 8, 8), options={"hidden": 5})
    assert isinstance(model, nn.Module)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    assert [m.out_features for m in model.modules() if isinstance(m, nn.Linear)] == [5, 3]


@pytest.mark.parametrize(
    "reference,fragment",
    [
        (f"{FACTORIES}:not_a_module", "returned str, not a torch.nn.Module"),
        (f"{FACTORIES}:missing", "has no attribute 'missing'"),
        ("tests.unit.no_such_module:model", "cannot import module"),
    ],
)
def test_broken_factory_is_config_error(reference: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_model(reference, num_classes=3, input_shape=(1, 8, 8), field="students[1].model")
    assert caught.value.field == "students[1].model"
    assert fragment in str(caught.value)


def test_check_model_name_validates_without_building() -> None:
    for name in ("wrn_28_10", f"{FACTORIES}:tiny_model", f"{FACTORIES}:not_a_module"):
        check_model_name(name, "model")
    check_model_name("mlp", "model", options={"hidden": [8]})
    with pytest.raises(ConfigError, match="^model: unknown model 'vgg'"):
        check_model_name("vgg", "model")
    with pytest.raises(ConfigError, match="is not callable"):
        check_model_name(f"{FACTORIES}:NOT_CALLABLE", "model")
    with pytest.raises(ConfigError, match=r"unknown option 'width' for model 'mlp' \(allowed: dropout, hidden\)"):
        check_model_name("mlp", "model", options={"width": 3})


def test_gradients_flow_through_heterogeneous_trio() -> None:
    torch.manual_seed(0)
    names = ("mlp", "small_cnn", "resnet20")
    cohort = [build_model(name, num_classes=10, input_shape=(1, 8, 8)) for name in names]
    images, labels = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])
    logits = [model(images) for model in cohort]
    loss = sum(F.cross_entropy(out, labels) for out in logits)
    for i, out in enumerate(logits):  # mutual-learning term: each student mimics the others' detached output
        for j, peer in enumerate(logits):
            if i != j:
                loss = loss + renyi_divergence(peer.detach(), out, alpha=2.0)  # the library's own mimicry term
    loss.backward()
    for model in cohort:
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum().item() for g in grads) > 0
