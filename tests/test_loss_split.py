"""The loss split: experts x posterior x routing multiply to each group's ratio to the baseline."""

import math

import pytest

from dfm.errors import DfmError
from eval.loss_split import length_bucket, loss_split, markdown_lines


def _bits():
    return {
        "baseline": [10.0, 20.0, 30.0, 40.0],
        "oracle": [11.0, 21.0, 29.0, 44.0],
        "bayes": [10.5, 20.5, 29.5, 43.0],
        "mixture": [12.0, 22.0, 31.0, 45.0],
        "top1": [13.0, 21.0, 33.0, 46.0],
    }


def test_factors_multiply_to_the_total_in_every_group() -> None:
    split = loss_split(_bits(), clusters=[0, 1, 0, 1], tokens=[10, 100, 300, 50], num_bytes=[5, 6, 7, 8], context=256)
    groups = [split["all"], *split["cluster"].values(), *split["length"].values()]
    assert len(groups) == 1 + 2 + 3
    for group in groups:
        for mode in ("bayes", "mixture", "top1"):
            factors = group["experts"] * group["posterior"] * group["modes"][mode]["routing"]
            assert math.isclose(factors, group["modes"][mode]["total"], rel_tol=1e-12)
    # cluster 0 is documents 0 and 2: oracle 40 bits against the baseline's 40
    assert split["cluster"]["0"]["experts"] == pytest.approx(40 / 40)
    assert split["cluster"]["1"]["modes"]["mixture"]["total"] == pytest.approx(67 / 60)
    assert {name: g["documents"] for name, g in split["length"].items()} == {"short": 2, "medium": 1, "long": 1}
    assert split["all"]["bytes"] == 26
    assert any("cluster 1" in line for line in markdown_lines(split))


def test_buckets_and_missing_scores() -> None:
    assert [length_bucket(n, 256) for n in (63, 64, 256, 257)] == ["short", "medium", "medium", "long"]
    bits = _bits()
    del bits["oracle"]
    with pytest.raises(DfmError, match="oracle"):
        loss_split(bits, [0, 1, 0, 1], [1, 2, 3, 4], [1, 1, 1, 1], 256)
