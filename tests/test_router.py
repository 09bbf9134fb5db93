"""The routing policies (kvflow/cluster/routers/) and the prefix index, model-free: made-up ReplicaLoads and
block hashes (the engine's own `hash_block` chain, block size 16), no Ray."""
import random

import pytest

from kvflow.cluster.prefix_index import PrefixIndex
from kvflow.cluster.router import ROUTERS, LoadTable, ReplicaLoad, RouteRequest, make_router
from kvflow.memory.kv_cache_manager import hash_block

BS = 16


def chain(tokens: list[int]) -> list[int]:
    """The chained hashes of the full blocks of `tokens`, as the engine computes them."""
    out, parent = [], None
    for i in range(0, len(tokens) - BS + 1, BS):
        parent = hash_block(parent, tokens[i:i + BS])
        out.append(parent)
    return out


SYSTEM_A = list(range(1000, 1000 + 8 * BS))          # two 8-block system prompts
SYSTEM_B = list(range(5000, 5000 + 8 * BS))


def req(rid="r", tokens=(), user=None, max_tokens=16) -> RouteRequest:
    tokens = list(tokens)
    return RouteRequest(rid, chain(tokens), len(tokens), max_tokens, user=user)


def fleet(*assigned, healthy=None, kv_blocks=0) -> list[ReplicaLoad]:
    return [ReplicaLoad(i, healthy=True if healthy is None else healthy[i], num_assigned=a, num_kv_blocks=kv_blocks)
            for i, a in enumerate(assigned)]


def route_and_count(router, loads, r) -> int:
    """Route as the client would: the chosen replica's in-flight count goes up."""
    i = router.route(r, loads)
    loads[i].num_assigned += 1
    return i


# ---- round-robin, least-load, power-of-two, predicted-load -----------------------------------------

def test_round_robin_cycles_and_skips_unhealthy():
    rr = make_router("round-robin", 4)
    loads = fleet(0, 0, 0, 0)
    assert [rr.route(req(), loads) for _ in range(6)] == [0, 1, 2, 3, 0, 1]
    loads[3].healthy = False
    assert [rr.route(req(), loads) for _ in range(4)] == [2, 0, 1, 2]


def test_least_load_picks_minimum_and_rotates_ties():
    ll = make_router("least-load", 4)
    assert ll.route(req(), fleet(5, 3, 7, 4)) == 1
    loads = fleet(2, 0, 1, 0)
    assert ll.route(req(), loads) == 3        # ties (1, 3): rotation from after the last pick (1)
    assert ll.route(req(), loads) == 1
    assert ll.route(req(), loads) == 3
    even = fleet(0, 0, 0, 0)
    assert sorted(ll.route(req(), even) for _ in range(4)) == [0, 1, 2, 3]
    # reported load counts too (max of assigned and running + waiting), KV usage breaks ties
    loads = [ReplicaLoad(0, num_running=6), ReplicaLoad(1, num_assigned=2, kv_cache_usage=0.9),
             ReplicaLoad(2, num_assigned=2, kv_cache_usage=0.1)]
    assert ll.route(req(), loads) == 2


def test_power_of_two_never_picks_most_loaded_of_three():
    for seed in range(5):
        p2 = make_router("power-of-two", 3, seed=seed)
        loads = fleet(1, 9, 4)
        picks = [p2.route(req(), loads) for _ in range(300)]
        assert 1 not in picks and {0, 2} <= set(picks)
        assert picks.count(0) > picks.count(2)    # 0 wins whenever it is drawn: 2 of the 3 pairs
    p2 = make_router("power-of-two", 5, seed=1)
    loads = fleet(0, 0, 9, 0, 0, healthy=[False, False, True, False, False])
    assert all(p2.route(req(), loads) == 2 for _ in range(50))


def test_power_of_two_is_reproducible_with_a_seed():
    loads = fleet(*range(10))
    a, b = make_router("power-of-two", 10, seed=7), make_router("power-of-two", 10, seed=7)
    assert [a.route(req(), loads) for _ in range(50)] == [b.route(req(), loads) for _ in range(50)]


def test_predicted_load_uses_outstanding_tokens_then_load():
    pl = make_router("predicted-load", 3)
    loads = fleet(1, 5, 2)
    for ld, tokens in zip(loads, (900.0, 100.0, 100.0)):
        ld.outstanding_tokens = tokens
    assert pl.route(req(), loads) == 2          # 1 and 2 tie on tokens; 2 has fewer requests
    loads[2].outstanding_tokens = 150.0
    assert pl.route(req(), loads) == 1          # many short requests beat one long one
    loads[1].healthy = False
    assert pl.route(req(), loads) == 2


# ---- cache-aware -------------------------------------------------------------------------------------

def test_cache_aware_follows_a_shared_system_prompt():
    ca = make_router("cache-aware", 4)
    loads = fleet(0, 0, 0, 0)
    first = route_and_count(ca, loads, req("a1", SYSTEM_A + [1] * 40))
    other = route_and_count(ca, loads, req("b1", SYSTEM_B + [2] * 40))
    assert other != first                      # no hit: least load
    for k in range(5):                         # same system prompt, different user turns
        assert route_and_count(ca, loads, req(f"a{k + 2}", SYSTEM_A + [k + 10] * 40)) == first
        assert route_and_count(ca, loads, req(f"b{k + 2}", SYSTEM_B + [k + 20] * 40)) == other
    assert ca.num_hits == 10
    assert ca.route(req("x", [7] * 200), loads) not in (first, other)    # unrelated prompt: least loaded


def test_cache_aware_prefers_the_longer_hit():
    ca = make_router("cache-aware", 3)
    loads = fleet(0, 0, 0)
    conv = SYSTEM_A + list(range(40, 40 + 6 * BS))                      # a conversation's first turn
    short = route_and_count(ca, loads, req("s", SYSTEM_A + [3] * 40))   # the system prompt alone
    loads[short].num_assigned = 4
    longer = route_and_count(ca, loads, req("t1", conv))                 # hit of 8 on `short`, but loaded...
    assert longer == short                                               # ...not overloaded: it still wins
    ca.index.clear(longer)
    ca.index.insert(0, chain(SYSTEM_A))                                  # 8 blocks on 0
    ca.index.insert(2, chain(conv))                                      # 14 blocks on 2
    loads = fleet(3, 0, 5)
    assert ca.route(req("t2", conv + list(range(9, 9 + 3 * BS))), loads) == 2
    assert ca.index.match(chain(conv)) == (14, 1 << 2)
    assert ca.index.match(chain(SYSTEM_A)) == (8, (1 << 0) | (1 << 2))


def test_cache_aware_falls_back_to_least_load_when_overloaded():
    ca = make_router("cache-aware", 3, balance_abs_threshold=4, balance_rel_threshold=1.5)
    ca.index.insert(1, chain(SYSTEM_A))
    r = req("a", SYSTEM_A + [5] * 32)
    assert ca.route(r, fleet(2, 6, 3)) == 1        # 6 > 2 * 1.5 but not > 2 + 4: keep the hit
    assert ca.route(r, fleet(10, 15, 11)) == 1     # > min + abs but not > min * rel
    assert ca.route(r, fleet(2, 7, 3)) == 0        # > min + abs and > min * rel: least loaded
    assert ca.num_balanced == 1


def test_cache_aware_forgets_a_replica_that_went_down():
    ca = make_router("cache-aware", 3)
    loads = fleet(0, 1, 1)
    assert ca.route(req("a", SYSTEM_A), loads) == 0
    loads = fleet(3, 1, 2)
    assert ca.route(req("b", SYSTEM_A + [1] * 16), loads) == 0
    loads[0].healthy = False                        # marked unhealthy before the client says so: no hit
    assert ca.route(req("c", SYSTEM_B), loads) == 1
    assert ca.route(req("d", SYSTEM_A), loads) == 1
    ca.on_replica_down(0)
    assert ca.index.num_blocks(0) == 0 and ca.index.match(chain(SYSTEM_A)) == (8, 1 << 1)
    ca.on_replica_up(0)
    loads = fleet(0, 3, 2)
    assert ca.route(req("e", SYSTEM_A + [4] * 16), loads) == 1      # 0 came back empty: the hit is on 1


def test_cache_aware_respects_lru_capacity():
    ca = make_router("cache-aware", 2, balance_abs_threshold=100)
    loads = fleet(0, 1, kv_blocks=10)
    a, b = chain(SYSTEM_A), chain(SYSTEM_B)
    assert ca.route(req("a", SYSTEM_A), loads) == 0                  # 8 blocks
    ca.index.insert(0, b)                                            # 16 > 10: A's tail goes first
    assert ca.index.num_blocks(0) == 10
    assert ca.index.hit_length(a, 0) == 2 and ca.index.hit_length(b, 0) == 8
    ca.index.insert(0, b + [99])                                     # longer than... still bounded
    assert ca.index.num_blocks(0) == 10 and ca.index.hit_length(a, 0) == 1
    assert len(ca.index.holders) == 10                               # forgotten blocks leave the index
    ca.index.set_capacity(0, 4)
    assert ca.index.num_blocks(0) == 4 and ca.index.hit_length(b, 0) == 4
    idx = PrefixIndex(1, capacity=0)                                 # 0: unbounded
    idx.insert(0, list(range(5000)))
    assert idx.num_blocks(0) == 5000 and idx.hit_length(list(range(5000)), 0) == 5000


def test_cache_aware_replicates_a_hot_prefix():
    def run(hot_min_count=8):
        ca = make_router("cache-aware", 4, hot_window=64, hot_min_count=hot_min_count, hot_share=0.5,
                         hot_load_gap=2)
        loads = fleet(0, 0, 0, 0)
        picks = [route_and_count(ca, loads, req(f"h{k}", SYSTEM_A + [k] * 32)) for k in range(24)]
        return ca, picks
    ca, picks = run(hot_min_count=10**9)              # replication off: the balance rule alone keeps it
    assert set(picks) == {0}
    ca, picks = run()
    assert picks[:8] == [0] * 8 and picks[8] != 0      # hot, all on 0, the others idle: replicate
    holders = ca.index.match(chain(SYSTEM_A))[1]
    assert bin(holders).count("1") >= 2 and ca.num_replicated >= 1
    assert len(set(picks[8:])) >= 2                    # and then both serve it
    assert max(picks.count(r) for r in set(picks)) < 20


def test_cache_aware_skips_empty_prompts_and_bounds_the_window():
    ca = make_router("cache-aware", 2, hot_window=5)
    loads = fleet(0, 0)
    assert ca.route(RouteRequest("e", [], 3, 8), loads) in (0, 1)
    for k in range(20):
        ca.route(req(f"k{k}", [k] * 32), loads)
    assert len(ca._window) == 5 and sum(ca._key_count.values()) == 5


# ---- session -----------------------------------------------------------------------------------------

def test_session_affinity_and_rebinding():
    s = make_router("session", 3, balance_abs_threshold=4, balance_rel_threshold=1.5)
    loads = fleet(2, 0, 1)
    assert s.route(req(user="alice"), loads) == 1
    assert s.route(req(user="bob"), fleet(0, 1, 1)) == 0
    loads = fleet(3, 4, 0)
    assert s.route(req(user="alice"), loads) == 1          # bound, not overloaded (4 <= 0 + 4)
    assert s.route(req(user="alice"), fleet(3, 5, 0)) == 2  # overloaded: least load, rebound
    assert s.route(req(user="alice"), fleet(3, 0, 3)) == 2  # follows the new binding
    loads = fleet(0, 0, 0, healthy=[True, True, False])
    assert s.route(req(user="alice"), loads) in (0, 1)     # unhealthy: rebound
    assert s.route(req(user=None), fleet(5, 1, 3)) == 1      # no user: least load
    assert s.route(req(user="bob"), fleet(1, 0, 0)) == 0
    s.on_replica_down(0)
    s.on_replica_up(0)                                        # came back empty: the binding is void
    assert s.route(req(user="bob"), fleet(1, 0, 2)) == 1


def test_session_map_is_bounded():
    s = make_router("session", 2, max_sessions=3)
    for u in "abcde":
        s.route(req(user=u), fleet(0, 0))
    assert list(s.sessions) == ["c", "d", "e"]
    with pytest.raises(ValueError):
        make_router("session", 2, max_sessions=0)


# ---- registry and the property every policy keeps --------------------------------------------------

def test_make_router_unknown_name():
    with pytest.raises(ValueError, match="router"):
        make_router("random-walk", 2)
    for name in ROUTERS:
        assert make_router(name, 2).name == name


@pytest.mark.parametrize("name", list(ROUTERS))
def test_never_routes_to_an_unhealthy_replica(name):
    rng = random.Random(sum(map(ord, name)))
    router = make_router(name, 8)
    prompts = [chain(SYSTEM_A), chain(SYSTEM_B), chain(SYSTEM_A + [1] * 48), chain([3] * 64)]
    for step in range(300):
        n = rng.randint(1, 8)
        loads = [ReplicaLoad(i, healthy=rng.random() < 0.6, num_running=rng.randint(0, 20),
                             num_waiting=rng.randint(0, 5), kv_cache_usage=rng.random(),
                             num_assigned=rng.randint(0, 30), outstanding_tokens=rng.uniform(0, 1e4),
                             num_kv_blocks=rng.choice((0, 12, 64))) for i in range(n)]
        loads[rng.randrange(n)].healthy = True
        r = RouteRequest(f"q{step}", rng.choice(prompts), 64, 16, user=rng.choice((None, "u1", "u2", "u3")))
        i = router.route(r, loads)
        assert 0 <= i < n and loads[i].healthy, (name, step, i)
        if rng.random() < 0.5:
            router.on_finished(r.request_id, i)
        if rng.random() < 0.05:
            j = rng.randrange(8)
            router.on_replica_down(j)
            router.on_replica_up(j)


@pytest.mark.parametrize("name", ["least-load", "cache-aware", "session"])
def test_load_table_routes_as_a_plain_list(name):
    """A LoadTable (loads plus their kept `load` values, which scan reads) makes the same choices as the
    plain list it caches, through random load changes, health flips and replacements."""
    rng = random.Random(7)
    n = 12
    plain = [ReplicaLoad(i) for i in range(n)]
    table = LoadTable(ReplicaLoad(i) for i in range(n))
    a, b = make_router(name, n), make_router(name, n)
    prompts = [chain(SYSTEM_A), chain(SYSTEM_B), []]
    for step in range(2000):
        j = rng.randrange(n)
        change = dict(num_assigned=rng.randint(0, 6), num_running=rng.randint(0, 4), num_waiting=rng.randint(0, 2),
                      kv_cache_usage=rng.choice((0.0, 0.25, 0.5)), healthy=rng.random() < 0.9)
        if not any(ld.healthy for k, ld in enumerate(plain) if k != j):
            change["healthy"] = True
        if rng.random() < 0.1:                    # replaced (a replica restarted): the table updates itself
            plain[j] = ReplicaLoad(j, **change)
            table[j] = ReplicaLoad(j, **change)
        else:
            for ld in (plain[j], table[j]):
                for k, v in change.items():
                    setattr(ld, k, v)
            table.update(j)
        table.check()
        r = RouteRequest(f"q{step}", rng.choice(prompts), 64, 16, user=rng.choice((None, "u1", "u2")))
        assert a.route(r, plain) == b.route(r, table), (name, step)
