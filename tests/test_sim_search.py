"""kvflow's best configuration (kvflow/sim/search.py): the search space comes from the presets and the registries,
equal configurations are simulated once, the coordinate descent finds a separable optimum, a second descent
explores the other family of shapes, the search never ends below where it started, keeps to its budget and
skips what the engine refuses; `kvflow sim compare` gets the row."""
import subprocess
import sys

import pytest

from kvflow.cluster.router import ROUTERS
from kvflow.scheduler.policy import POLICIES
from kvflow.sim.compare import compare, format_compare
from kvflow.sim.cost_model import load_profile
from kvflow.sim.search import PD_ONLY, canonical, default, search, search_space
from kvflow.sim.workload import parse_workload


def points(goodputs, throughput=1.0):
    """compare's points for one configuration: one {rate, summary} per goodput."""
    return [{"rate": float(i + 1), "summary": {"goodput": g, "output_throughput": throughput}}
            for i, g in enumerate(goodputs)]


def test_space_is_the_presets_options_and_the_registries():
    space = search_space(4)
    assert space["shape"] == [{"replicas": 4}, {"prefill_replicas": 1, "decode_replicas": 3},
                              {"prefill_replicas": 2, "decode_replicas": 2}, {"prefill_replicas": 3, "decode_replicas": 1}]
    assert set(space["router"]) == set(ROUTERS) and set(space["pd_policy"]) == set(ROUTERS)
    assert set(space["scheduling_policy"]) == set(POLICIES)
    for key, values in space.items():
        if key != "shape":
            assert values[0] == default(key) and len(values) == len(set(map(repr, values))) >= 2, key
    assert {"kv_pool", "early_rejection", "kv_transfer", "enable_chunked_prefill", "kv_reservation"} <= set(space)
    assert "serverless" not in space and "replicas" not in space
    assert "router" not in search_space(2, fixed={"router": "least-load"})     # given on the command line
    assert search_space(1)["shape"] == [{"replicas": 1}]


def test_canonical_drops_what_changes_nothing():
    colocated = {"replicas": 2, "router": "least-load", "kv_pool": True, "scheduling_policy": "sjf"}
    assert default("router") == "least-load"
    assert canonical(colocated) == {"replicas": 2, "scheduling_policy": "sjf"}
    pd = {"prefill_replicas": 1, "decode_replicas": 1, "kv_pool": True, "kv_transfer": default("kv_transfer")}
    assert canonical(pd) == {"prefill_replicas": 1, "decode_replicas": 1, "kv_pool": True}
    assert set(PD_ONLY) <= set(search_space(2))


def test_descent_finds_a_separable_optimum_and_simulates_each_configuration_once():
    """A made-up objective: +1 for each of three chosen option values, +0.5 for P/D with 1 prefill worker."""
    want = {"scheduling_policy": "sjf", "enable_chunked_prefill": False, "kv_reservation": "static"}
    calls = []

    def evaluate(options):
        calls.append(tuple(sorted(options.items())))
        g = sum(options.get(k, default(k)) == v for k, v in want.items())
        g += 0.5 * (options.get("prefill_replicas") == 1)
        return points([g])

    found = search(evaluate, 2, {}, [("kvflow", {"replicas": 2}, points([0.0]))], budget=500)
    assert found["options"] == {"prefill_replicas": 1, "decode_replicas": 1, **want}
    assert found["score"][0] == 3.5 and found["start"] == "kvflow"
    assert len(calls) == len(set(calls)) == found["evaluations"] < 500          # each configuration once
    assert [t["score"][0] for t in found["trail"]] == sorted(t["score"][0] for t in found["trail"])
    assert search(evaluate, 2, {}, [("kvflow", {"replicas": 2}, points([0.0]))], budget=500) == found


def test_a_second_descent_explores_the_other_family_of_shapes():
    """Two basins: colocated replicas score 3 whatever their options; P/D workers 1, +2 with the KV pool and +3
    with min-ttft decode placement. One option at a time, a descent from the colocated start never reaches
    the P/D optimum (the P/D shape alone scores 1); the second descent, from the best P/D configuration
    simulated, does."""
    def evaluate(options):
        if not options.get("prefill_replicas"):
            return points([3.0])
        return points([1.0 + 2.0 * bool(options.get("kv_pool")) + 3.0 * (options.get("pd_policy") == "min-ttft")])

    found = search(evaluate, 2, {}, [("vllm", {"replicas": 2}, points([3.0]))], budget=500)
    assert found["options"] == {"prefill_replicas": 1, "decode_replicas": 1, "kv_pool": True, "pd_policy": "min-ttft"}
    assert found["score"][0] == 6.0 and found["starts"] == ["vllm", "the best pd configuration simulated"]
    assert found["start"] == "the best pd configuration simulated" and found["trail"][0]["start"] == "vllm"
    starts = [("vllm", {"replicas": 2}, points([3.0])),
              ("distserve", {"prefill_replicas": 1, "decode_replicas": 1}, points([1.0]))]
    again = search(evaluate, 2, {}, starts, budget=500)
    assert again["options"] == found["options"] and again["start"] == "distserve"
    assert again["starts"] == ["vllm", "distserve"] and again["evaluations"] < found["evaluations"] + 1
    scores = [t["score"][0] for t in again["trail"]]                  # improvements on the best so far only
    assert scores[0] == 3.0 and scores[-1] == 6.0 and scores == sorted(set(scores))
    short = search(evaluate, 2, {}, starts, budget=3)                 # one budget for both descents
    assert short["evaluations"] == 3 and short["starts"] == ["vllm"] and short["score"][0] == 3.0


def test_descent_keeps_its_budget_and_its_start_and_skips_refusals():
    def refuse_all(options):
        raise ValueError("no")

    starts = [("a", {"replicas": 2}, points([1.0, 1.0])), ("b", {"replicas": 2, "kv_reservation": "static"},
                                                          points([1.0, 2.0]))]
    found = search(refuse_all, 2, {}, starts, budget=7)
    assert found["evaluations"] == 7 and len(found["skipped"]) == 7 and all(why == "no" for _, why in found["skipped"])
    assert found["start"] == "b" and found["options"] == {"replicas": 2, "kv_reservation": "static"}
    assert search(refuse_all, 2, {}, starts, budget=0)["evaluations"] == 0
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="budget"):
            search(refuse_all, 2, {}, starts, budget=bad)


def test_compare_adds_kvflows_best_row():
    """On a workload of shared prefixes, the search starts from the best preset and never ends below any row
    (serverless aside); every simulation it runs returns its blocks (compare checks each replica)."""
    workload = parse_workload("multitenant:n=60,rate=1,turns=3,tenants=4,seed=3")
    result = compare(["vllm", "preble", "distserve", "deepflow", "kvflow"], workload, load_profile("cpu"), 2,
                     [2.0, 6.0], {"ttft": 2000, "tpot": 150}, {"num_kv_blocks": 512}, search_budget=12)
    rows = {r["preset"]: r for r in result["rows"]}
    assert list(rows)[-1] == "kvflow-best" and result["search"]["evaluations"] <= 12
    best = sum(p["summary"]["goodput"] for p in rows["kvflow-best"]["points"])
    for name in ("vllm", "preble", "distserve", "kvflow"):
        assert best >= sum(p["summary"]["goodput"] for p in rows[name]["points"]), name
    assert result["search"]["start"] in rows
    table = format_compare(result)
    assert "kvflow-best" in table and "configurations simulated" in table
    assert "num_kv_blocks" not in result["search"]["options"]                # given, so fixed
    no_search = compare(["vllm"], workload, load_profile("cpu"), 2, [2.0], {"ttft": 2000}, {"num_kv_blocks": 512})
    assert "search" not in no_search and [r["preset"] for r in no_search["rows"]] == ["vllm"]


def test_cli_search_budget():
    proc = subprocess.run([sys.executable, "-m", "kvflow", "sim", "compare", "--workload", "chat:n=20,seed=1",
                           "--presets", "vllm", "--gpus", "2", "--rates", "4", "--hardware", "h100",
                           "--search-budget", "3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "kvflow-best" in proc.stdout and "3 configurations simulated" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "kvflow", "sim", "compare", "--workload", "chat:n=20,seed=1",
                           "--search-budget", "-1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--search-budget" in proc.stderr
