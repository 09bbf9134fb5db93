"""The benchmark scripts (benchmarks/*.py) are run by hand, on a quiet machine, not by the suite: this checks
that each one at least compiles, and the few helpers of theirs that format results."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import py_compile

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("path", sorted(BENCHMARKS.glob("*.py")), ids=lambda p: p.name)
def test_a_benchmark_script_compiles(path, tmp_path):
    py_compile.compile(str(path), cfile=str(tmp_path / "out.pyc"), doraise=True)


def test_sim_fidelity_states_the_co_run_figures_by_what_they_multiply():
    from kvflow.sim.cost_model import load_profile
    spec = importlib.util.spec_from_file_location("sim_fidelity", BENCHMARKS / "sim_fidelity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    profile = json.loads(load_profile("cpu").to_json())
    profile["params"]["coef"][0] = 0.005
    step = {**profile, "corun_slowdown": 1.1, "corun_by_kind": {"decode": {"decode": 1.3},
                                                                 "prefill": {"prefill": 0.98}}}
    assert mod.corun_words(step) == ("1.100x slower than alone; a decode beside a decode 1.300x; "
                                     "a prefill beside a prefill 0.980x")
    fixed = {**step, "corun_part": "fixed", "corun_by_kind": {"decode": {"decode": 1.7, "prefill": 1.2},
                                                               "prefill": {"prefill": 0.98}}}
    assert mod.corun_words(fixed) == ("a decode beside the other's decode takes 0.700x the fixed cost (5.00 ms) "
                                      "longer, beside a prefill 0.200x, whatever its rows; a prefill beside a "
                                      "prefill 0.980x")
