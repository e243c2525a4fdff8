"""The memory prediction's parameter counts match real models."""

import pytest

from benchmarks.memory_model import (
    LLAMA3_8B,
    Shapes,
    global_bytes,
    layerwise_bytes,
)
from tests.testing_utils import make_model


@pytest.mark.unit
@pytest.mark.parametrize("tied", [False, True])
def test_shapes_count_the_parameters_of_a_real_llama(tied):
    model = make_model("llama", tie_word_embeddings=tied)
    shapes = Shapes.from_config("tiny", model.config.to_dict())
    assert shapes.params == sum(p.numel() for p in model.parameters())


@pytest.mark.unit
def test_llama3_8b_shapes_give_its_published_size():
    assert abs(LLAMA3_8B.params - 8.03e9) < 0.01e9


@pytest.mark.unit
def test_layerwise_device_memory_does_not_grow_with_depth():
    shallow = Shapes("a", 2, 256, 512, 4, 2, 1000, False)
    deep = Shapes("b", 40, 256, 512, 4, 2, 1000, False)
    assert (
        layerwise_bytes(shallow, 4, 128, 64, 1024)["total"]
        == (layerwise_bytes(deep, 4, 128, 64, 1024)["total"])
    )
    assert global_bytes(deep, 512)["total"] > global_bytes(shallow, 512)["total"]
