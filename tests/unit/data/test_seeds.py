"""Tests for minima_cli.data.seeds: the compact permutation draws exactly numpy's
`Generator.permutation` order, so existing runs see the same shuffles and split."""

from __future__ import annotations

import numpy as np
import pytest

from minima_cli.data import seeds
from minima_cli.data.seeds import SHUFFLE, index_dtype, permutation


@pytest.mark.parametrize("n", [0, 1, 2, 97, 65_535, 65_536, 65_537, 300_007])
@pytest.mark.parametrize("key", [[0, SHUFFLE, 0, 0], [5, SHUFFLE, 1, 3], [123_456, 1]])
def test_uint32_permutation_is_numpys_int64_permutation(n: int, key: list[int]) -> None:
    order = permutation(n, key)
    assert order.dtype == np.uint32 and order.nbytes == 4 * n
    assert np.array_equal(order, np.random.default_rng(key).permutation(n))


def test_index_dtype_falls_back_to_int64_above_2_to_the_32(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    assert index_dtype(1 << 32) == np.uint32  # indices 0 .. 2**32 - 1 fit
    assert index_dtype((1 << 32) + 1) == np.int64
    # the int64 path draws the same order too (too large to run at its real size)
    monkeypatch.setattr(seeds, "index_dtype", lambda n: np.dtype(np.int64))
    order = permutation(70_001, [9, SHUFFLE])
    assert order.dtype == np.int64
    assert np.array_equal(order, np.random.default_rng([9, SHUFFLE]).permutation(70_001))


def test_block_order_of_existing_runs_is_unchanged() -> None:
    from minima_cli.data.streams import shuffle_order

    # what MixedBlockStream served before: numpy's int64 permutation of the same key
    for n, seed, source, epoch in ((70_000, 0, 0, 0), (131_071, 3, 1, 2)):
        expected = np.random.default_rng([seed, SHUFFLE, source, epoch]).permutation(n)
        assert np.array_equal(shuffle_order(n, seed, source, epoch), expected)
