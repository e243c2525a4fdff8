"""vLLM serves the shared layout's stock export with the same greedy tokens as
transformers. Opt-in: ``bash serving/install.sh``, then
``python -m pytest -m serving tests/serving``."""

import pytest

from tests.testing_utils import (
    REPO,
    make_model,
    run_oneshot,
    save_model,
    shipped_recipe,
)

pytestmark = pytest.mark.serving


def test_vllm_greedy_tokens_equal_transformers(tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "serving"))
    import check_serving

    if not check_serving.SERVING_PYTHON.is_file():
        pytest.fail("the serving environment is missing: run bash serving/install.sh")
    dense = save_model(
        make_model("llama", hidden=128, intermediate=1024), tmp_path / "d"
    )
    recipe = shipped_recipe(tmp_path, "tomoe_50_shared.yaml", iters=4, num_experts=4)
    run_oneshot(dense, recipe, tmp_path / "export")
    out = tmp_path / "serving.json"
    code = check_serving.main(
        [
            str(tmp_path / "export"),
            "--dense",
            dense,
            "--dtype",
            "float32",
            "--speed-tokens",
            "16",
            "--rounds",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0, out.read_text()
