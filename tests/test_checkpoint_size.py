"""The 13B config's adapter checkpoint is a small fraction of the backbone, computed at full size on meta."""

from tests.conftest import REPO, load_benchmark


def test_llama2_13b_adapters_are_under_one_percent_of_the_backbone() -> None:
    s = load_benchmark("checkpoint_size").sizes(REPO / "conf" / "llama2-13b.yaml")
    assert s["backbone_params"] == 13_015_864_320
    assert s["adapter_params"] == 80 * (8 * 8 * 5120 * 2 + 5120 * 8 + 5120 + 1) == 56_115_280
    assert s["adapter_bytes"] / s["backbone_bytes"] < 0.01
