"""Each benchmark figure names the CPU it ran on: the model and the vector instructions read here
agree with what numpy detects on the same CPU."""

from __future__ import annotations

import os
import sys

import pytest

from thighseg.core import machine


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/cpuinfo is Linux's")
def test_the_cpus_vector_instructions_agree_with_numpys_detection():
    from numpy.core._multiarray_umath import __cpu_features__ as numpy_found

    cpu = machine.cpu()
    assert cpu["model"]
    assert cpu["cpus"] == len(os.sched_getaffinity(0))
    assert ("avx2" in cpu["speed_flags"]) == numpy_found["AVX2"]
    assert ("avx512f" in cpu["speed_flags"]) == numpy_found["AVX512F"]


def test_a_cpu_is_described_in_one_line():
    assert machine.described({"model": "AMD EPYC", "speed_flags": ["avx2"], "cpus": 2}) == (
        "AMD EPYC (avx2), 2 CPUs"
    )
    assert machine.described({"model": "", "speed_flags": [], "cpus": 1}) == (
        "unknown CPU (no AVX2), 1 CPU"
    )
