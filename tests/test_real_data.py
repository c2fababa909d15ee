"""Accuracy on the real CIFAR-10 checkpoint; skipped when ../shared is absent."""

import lowbit
from lowbit.data import Batches, load_dataset
from lowbit.models import MODELS, build_model
from tests.conftest import CIFAR10, RESNET20, needs_shared


@needs_shared(CIFAR10, RESNET20)
def test_resnet20_w8a8_within_half_a_point_on_2000_test_images():
    data = load_dataset(f"cifar10={CIFAR10}")
    model = build_model("resnet20", RESNET20)
    norm = MODELS["resnet20"].normalization
    test = Batches(data.test.head(2000), norm, 500)
    fp = lowbit.evaluate(model, test)
    q = lowbit.quantize(model, lowbit.PTQConfig(w_bits=8, a_bits=8),
                        Batches(data.train.subset(512), norm, 256))
    assert abs(lowbit.evaluate(q, test) - fp) <= 0.5
