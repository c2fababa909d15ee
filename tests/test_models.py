import pytest
import torch

from lowbit.models import MODELS, build_model
from tests.conftest import SHARED

CKPTS = {"resnet20": "akamaster_resnet20-12fca82f.th", "resnet32": "akamaster_resnet32-d509ac18.th",
         "psg_resnet32": "PSG_ResNet150.pth"}


@pytest.mark.parametrize("name", list(MODELS))
def test_models_build_and_run(name):
    model = build_model(name)
    x = torch.randn(2, 1 if name == "digits_cnn" else 3, 8 if name == "digits_cnn" else 32,
                    8 if name == "digits_cnn" else 32)
    assert model(x).shape == (2, MODELS[name].num_classes)


@pytest.mark.parametrize("name,ck", list(CKPTS.items()))
def test_public_checkpoints_load_strictly(name, ck):
    path = SHARED / "checkpoints" / ck
    if not path.exists():
        pytest.skip(f"shared checkpoint absent: {path}")
    model = build_model(name, path)
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


def test_resnet_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(build_model("resnet20")) == 269_722  # He et al. 2016: 0.27M
    assert count(build_model("resnet56")) == 853_018  # 0.85M


@pytest.mark.parametrize("name, width", [("mobilenet_v2_cifar", 1.0),
                                         ("mobilenet_v2_cifar_050", 0.5)])
def test_cifar_mobilenet_v2_has_torchvisions_layout(torchvision_models, name, width):
    """Same state-dict keys and shapes as torchvision's mobilenet_v2 (so its checkpoints load),
    with the CIFAR strides: a 32 px input reaches the last stage at 4 x 4."""
    model = build_model(name, None).eval()
    reference = torchvision_models.mobilenet_v2(num_classes=100, width_mult=width).state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in reference.items()}
    assert model.features(torch.randn(1, 3, 32, 32)).shape[-2:] == (4, 4)
