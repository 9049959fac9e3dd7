"""The CPU-speed probe the gate judges kernel rounds by: its kernel against a float64 reference, and its
reading against its own flop count."""

import numpy as np
import pytest

from perfsim.kernels import probe


@pytest.mark.parametrize("threads, n_values, reps", [(1, 64, 1), (2, 512, 7), (3, 2048, 3)])
def test_dot_chain_matches_its_reference(threads, n_values, reps):
    rng = np.random.default_rng(threads)
    blocks, x = rng.random((threads, n_values), dtype=np.float32), rng.random(n_values, dtype=np.float32)
    np.testing.assert_allclose(probe.dot_chain(blocks, x, reps), probe.dot_chain_reference(blocks, x, reps), rtol=1e-4)


def test_dot_chain_cost_counts_a_multiply_and_an_add_per_value_per_repeat_per_thread():
    assert probe.dot_chain_cost(2, n_values=100, reps=3).flops == 2 * 2 * 100 * 3
    assert probe.dot_chain_cost(1).bytes == 0  # its operands stay in L1: no memory traffic to count


def test_the_probe_reads_a_plausible_rate_and_leaves_the_thread_count_it_was_given():
    from perfsim.kernels.jit import threads_in_use

    gflops = probe.cpu_speed_gflops(1)
    assert 0.5 < gflops < 500  # a chain of FMAs on one core of anything from a phone to a server
    assert threads_in_use() == 1
