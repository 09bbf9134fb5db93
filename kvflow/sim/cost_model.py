"""Hardware profiles and the step-time models the simulator reads them with.

A profile (JSON; kvflow/sim/profiles/*.json, or any path) says what hardware and model it describes, where
its numbers come from (`source`: calibrated on this machine, or a roofline), and how long a step takes as a
function of the step's shape: the features the scheduler's own step-time model uses (kvflow/scheduler/
costs.py): decode rows, prefill tokens, the decodes' context (thousands of tokens) and the prefill chunks'
attention (millions of token pairs). Two cost models, a registry:

  linear    seconds = coef . [1, decode rows, prefill tokens, decode context / 1e3, prefill pairs / 1e6,
                              step tokens > knee_tokens[0], step tokens > knee_tokens[1], ...,
                              min(step tokens, hinge_tokens[0]) / 1e3, ...]
            (fitted by `kvflow sim calibrate` from measured steps). The knee terms are steps of the fixed cost:
            a matmul library changes kernels once the batch passes a size (oneDNN's bf16 GEMM on AVX-512: a
            step of 65 or more tokens costs ~65 ms more at one thread than one of 64, at the same per-token
            slope), which a straight line through steps of every size cannot follow. A hinge term is a slope
            change: each of a step's first hinge_tokens tokens costs that much more than the rest (a matmul
            of a few rows runs below the throughput of a wide one: on a 2-core AMD EPYC a 2,048-token prompt
            step took 0.90x a straight line fitted mostly on steps of 8-257 tokens).
  roofline  seconds = launch + max(flops / (peak x mfu), bytes / (bandwidth x efficiency)): the weights are
            read once per step, the decodes read their KV, every token costs 2 x params flops and every
            attention pair 4 x layers x heads x head_dim flops (GPU profiles: H100, H200, A100)

A profile also carries the KV budget of one device, the link bandwidth of a P/D KV transfer, the host
swap bandwidth and a replica's cold start (serverless). No torch.
"""
from __future__ import annotations

import json
import math
import os
import random
import statistics
from dataclasses import asdict, dataclass, field

PROFILE_DIR = os.path.join(os.path.dirname(__file__), "profiles")

# the default model, SmolLM2-135M-Instruct (kvflow's DEFAULT_MODEL_FILE); other models: put their spec in a profile
SMOLLM2_135M = dict(name="SmolLM2-135M-Instruct", num_params=134_515_008, num_layers=30, hidden_size=576,
                    num_heads=9, num_kv_heads=3, head_dim=64, max_model_len=8192)

# peak dense bf16 matmul FLOP/s, memory bandwidth (B/s), device memory (B), inter-node link (B/s): datasheets
GPU_SPECS = {
    "h100": dict(peak_flops=989e12, mem_bytes_per_s=3.35e12, mem_bytes=80e9, link_bytes_per_s=50e9),
    "h200": dict(peak_flops=989e12, mem_bytes_per_s=4.8e12, mem_bytes=141e9, link_bytes_per_s=50e9),
    "a100": dict(peak_flops=312e12, mem_bytes_per_s=2.0e12, mem_bytes=80e9, link_bytes_per_s=25e9),
}
DTYPE_BYTES = {"bfloat16": 2, "float32": 4, "float16": 2}


def kv_bytes_per_token(model: dict, dtype: str) -> int:
    """K and V of one token in every layer (as ModelConfig.kv_bytes_per_token)."""
    return 2 * model["num_layers"] * model["num_kv_heads"] * model["head_dim"] * DTYPE_BYTES[dtype]


def chances(value, field: str, what: str) -> tuple[float, ...]:
    """One number in [0, 1], or a non-empty list of them, as a tuple; ValueError naming `field` otherwise."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values or not all(not isinstance(a, bool) and isinstance(a, (int, float)) and 0.0 <= a <= 1.0
                             for a in values):
        raise ValueError(f"{field} must be a number in [0, 1] or a non-empty list of them ({what}), got {value!r}")
    return tuple(float(a) for a in values)


def acceptance_by_position(value) -> tuple[float, ...]:
    """A draft's chance to be accepted, given that the drafts before it were, by draft position: one number
    for every position, or a list with one per position (the last holds for the positions after it).
    ValueError naming spec_acceptance otherwise."""
    return chances(value, "spec_acceptance", "one per draft position")


def propose_rates(value) -> tuple[float, ...]:
    """The chance that a request asked to draft gets drafts: one number for every request, or a list of the
    requests' own chances (each request takes one of them, all equally likely: a served run's requests, by
    quantile). ValueError naming spec_propose_rate otherwise."""
    return chances(value, "spec_propose_rate", "the requests' own")


@dataclass
class HardwareProfile:
    name: str
    kind: str                          # the cost model: a COST_MODELS name
    source: str                        # where the numbers come from (calibration or roofline), in words
    model: dict                        # the model's shape (see SMOLLM2_135M)
    dtype: str = "bfloat16"
    params: dict = field(default_factory=dict)   # the cost model's own numbers
    kv_cache_bytes: int = 1 << 30      # KV budget of one replica (device)
    link_bytes_per_s: float = 10e9     # prefill -> decode KV transfer
    swap_bytes_per_s: float = 4e9      # device <-> host (swap tier)
    disk_bytes_per_s: float = 2e9      # reads from the disk tier of the prefix cache (an NVMe drive)
    cold_start_s: float = 5.0          # a serverless replica from nothing to serving
    fit: dict = field(default_factory=dict)     # calibration quality (steps, R^2, median relative error)
    # replicas that share one machine's memory system (CPU cores; `kvflow sim calibrate --together N`): a step
    # beside k of the n - 1 others' takes 1 + (corun_slowdown - 1) * k / (n - 1) times its time alone
    replicas_per_machine: int = 1
    corun_slowdown: float = 1.0
    # by the kinds of the two steps (measured from served steps: calibrate --workload): {own: {neighbour's:
    # slowdown}}, kinds "decode" (decode rows only) and "prefill" (any prefill tokens); a pair it lacks takes
    # corun_slowdown. On a CPU a decode beside another decode slows most: both stream the weights from memory
    corun_by_kind: dict = field(default_factory=dict)
    # what a co-run factor f multiplies: "step" the step's whole time; "fixed" (a fleet's served fit), for a
    # decode-only step, the cost model's fixed cost (CostModel.fixed_seconds: the weights' read, which steps on
    # cores sharing memory contend for), so it takes (f - 1) x that much longer whatever its rows (beside
    # another's decode a one-row decode slows by a larger share of its time than a several-row one); a step
    # with prompt tokens (compute bound) is still slowed as a whole
    corun_part: str = "step"
    # a workload's drafts accepted per draft position tried, position by position (the first draft's, the
    # second's given the first was accepted, ...), measured serving it with speculative decoding (`kvflow sim
    # calibrate --workload W --speculative-config ...`): the simulation's spec_acceptance when it is not given
    # one; None: not measured (a profile written before may hold one number for every position)
    spec_acceptance: float | list[float] | None = None
    # ... and the share of requests asked to draft that the proposer gave drafts (an n-gram proposer finds
    # none without a match in the context; a model always drafts): one number, or the served requests' own
    # shares by quantile (a repetitive answer matches at most steps, another at few); None: not measured
    # (every ask drafts)
    spec_propose_rate: float | list[float] | None = None

    def __post_init__(self):
        if self.kind not in COST_MODELS:
            raise ValueError(f"kind must be one of {', '.join(COST_MODELS)}, got {self.kind!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        for key in ("num_layers", "num_kv_heads", "head_dim", "num_params"):
            if not isinstance(self.model.get(key), int) or self.model[key] <= 0:
                raise ValueError(f"model.{key} must be a positive integer, got {self.model.get(key)!r}")
        for key in ("kv_cache_bytes", "link_bytes_per_s", "swap_bytes_per_s", "disk_bytes_per_s"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)!r}")
        if self.cold_start_s < 0:
            raise ValueError(f"cold_start_s must be >= 0, got {self.cold_start_s!r}")
        if not (isinstance(self.replicas_per_machine, int) and self.replicas_per_machine >= 1):
            raise ValueError(f"replicas_per_machine must be an integer >= 1, got {self.replicas_per_machine!r}")
        if self.spec_acceptance is not None:
            acceptance_by_position(self.spec_acceptance)
        if self.spec_propose_rate is not None:
            propose_rates(self.spec_propose_rate)
        if self.corun_part not in CORUN_PARTS:
            raise ValueError(f"corun_part must be one of {', '.join(CORUN_PARTS)}, got {self.corun_part!r}")
        if not self.corun_slowdown > 0:
            raise ValueError(f"corun_slowdown must be positive, got {self.corun_slowdown!r}")
        for own, row in self.corun_by_kind.items():
            if own not in STEP_KINDS or not isinstance(row, dict) or any(
                    k not in STEP_KINDS or not (isinstance(v, (int, float)) and v > 0) for k, v in row.items()):
                raise ValueError(f"corun_by_kind must map a step kind ({', '.join(STEP_KINDS)}) to a map of step "
                                 f"kinds to positive slowdowns, got {self.corun_by_kind!r}")

    @property
    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.model, self.dtype)

    def cost_model(self) -> "CostModel":
        return COST_MODELS[self.kind](self)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json() + "\n")


def list_profiles() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(PROFILE_DIR) if f.endswith(".json"))


def load_profile(name_or_path: str) -> HardwareProfile:
    """A built-in profile by name (kvflow/sim/profiles) or a JSON file; ValueError naming `hardware`."""
    path = name_or_path if os.path.isfile(name_or_path) else os.path.join(PROFILE_DIR, f"{name_or_path}.json")
    if not os.path.isfile(path):
        raise ValueError(f"hardware must be a profile file or one of {', '.join(list_profiles())}, "
                         f"got {name_or_path!r}")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"hardware: {path} is not JSON ({e})") from None
    try:
        return HardwareProfile(**data)
    except TypeError as e:
        raise ValueError(f"hardware: {path} is not a hardware profile ({e})") from None


class CostModel:
    """Seconds of one step of a given shape, and of moving KV bytes between devices."""

    def __init__(self, profile: HardwareProfile):
        self.profile = profile

    def step_seconds(self, decode_rows: int, prefill_tokens: int, decode_context: int, prefill_pairs: float) -> float:
        raise NotImplementedError

    def transfer_seconds(self, num_bytes: float) -> float:
        return num_bytes / self.profile.link_bytes_per_s

    def block_op_seconds(self, kind: str, num_bytes: float) -> float:
        """A step's BlockOp of `kind` moving `num_bytes` (kvflow/engine/block_ops.py: every kind is a copy of
        whole blocks in memory, before the forward: device <-> swap tier, device -> device, and the disk tier's
        host side; its files are read and written off the step). At the host link's (swap) rate: on a CPU
        device and host memory are one."""
        return num_bytes / self.profile.swap_bytes_per_s

    def step_started(self, seconds: float, prefill_tokens: int = 0) -> float:
        """A step priced `seconds` (computing `prefill_tokens` prompt tokens) starts now on the replica this model
        prices: how long it will take (alone on its machine: as priced; OnSharedMachine: slower beside the
        machine's other replicas' steps)."""
        return seconds

    def fixed_seconds(self) -> float:
        """The part of every step's time that does not grow with its shape: a step of nothing's price (a
        calibrated model's per-step term; a roofline's launch and the weights' read)."""
        return self.step_seconds(0, 0, 0, 0.0)


class LinearCost(CostModel):
    def __init__(self, profile: HardwareProfile):
        super().__init__(profile)
        coef = profile.params.get("coef")
        knees, hinges = profile.params.get("knee_tokens", []), profile.params.get("hinge_tokens", [])
        for name, ks in (("knee_tokens", knees), ("hinge_tokens", hinges)):
            if not isinstance(ks, list) or any(not isinstance(k, int) or k < 0 for k in ks):
                raise ValueError(f"params.{name} must be a list of non-negative integers, got {ks!r}")
        n = 5 + len(knees) + len(hinges)
        if not isinstance(coef, list) or len(coef) != n or any(not c >= 0 for c in coef):
            raise ValueError(f"params.coef must be {n} non-negative numbers (seconds: per step, per "
                             f"decode row, per prefill token, per 1e3 decode-context tokens, per 1e6 prefill pairs, "
                             f"then one for each of params.knee_tokens and per 1e3 tokens for each of "
                             f"params.hinge_tokens), got {coef!r}")
        self.c0, self.c1, self.c2, self.c3, self.c4 = (float(c) for c in coef[:5])
        self.knees = list(zip(knees, (float(c) for c in coef[5:5 + len(knees)])))
        self.hinges = list(zip(hinges, (float(c) / 1e3 for c in coef[5 + len(knees):])))

    def step_seconds(self, decode_rows, prefill_tokens, decode_context, prefill_pairs):
        tokens = decode_rows + prefill_tokens
        return (self.c0 + self.c1 * decode_rows + self.c2 * prefill_tokens + self.c3 * decode_context / 1e3
                + self.c4 * prefill_pairs / 1e6 + sum(c for knee, c in self.knees if tokens > knee)
                + sum(c * (tokens if tokens < hinge else hinge) for hinge, c in self.hinges))


class RooflineCost(CostModel):
    def __init__(self, profile: HardwareProfile):
        super().__init__(profile)
        p, m = profile.params, profile.model
        for key in ("peak_flops", "mem_bytes_per_s", "mfu", "bw_efficiency", "launch_s"):
            if not isinstance(p.get(key), (int, float)) or p[key] < 0:
                raise ValueError(f"params.{key} must be a non-negative number, got {p.get(key)!r}")
        self.flops_per_token = 2.0 * m["num_params"]
        self.flops_per_pair = 4.0 * m["num_layers"] * m.get("num_heads", m["num_kv_heads"]) * m["head_dim"]
        self.flops_per_s = p["peak_flops"] * p["mfu"]
        self.bytes_per_s = p["mem_bytes_per_s"] * p["bw_efficiency"]
        self.weight_bytes = m["num_params"] * DTYPE_BYTES[profile.dtype]
        self.kv_token_bytes = profile.kv_bytes_per_token
        self.launch_s = p["launch_s"]

    def step_seconds(self, decode_rows, prefill_tokens, decode_context, prefill_pairs):
        flops = (decode_rows + prefill_tokens) * self.flops_per_token + (decode_context + prefill_pairs) * \
            self.flops_per_pair
        num_bytes = self.weight_bytes + decode_context * self.kv_token_bytes
        return self.launch_s + max(flops / self.flops_per_s, num_bytes / self.bytes_per_s)

    def block_op_seconds(self, kind: str, num_bytes: float) -> float:
        """A device -> device copy reads and writes HBM; the others cross the host link (swap_bytes_per_s)."""
        return 2 * num_bytes / self.bytes_per_s if kind == "copy" else super().block_op_seconds(kind, num_bytes)


COST_MODELS: dict[str, type[CostModel]] = {"linear": LinearCost, "roofline": RooflineCost}


class Wrapped(CostModel):
    """Another cost model, every price its own until a subclass changes one (Jittered, OnSharedMachine)."""

    def __init__(self, inner: CostModel):
        super().__init__(inner.profile)
        self.inner = inner

    def step_seconds(self, decode_rows, prefill_tokens, decode_context, prefill_pairs):
        return self.inner.step_seconds(decode_rows, prefill_tokens, decode_context, prefill_pairs)

    def transfer_seconds(self, num_bytes: float) -> float:
        return self.inner.transfer_seconds(num_bytes)

    def block_op_seconds(self, kind: str, num_bytes: float) -> float:
        return self.inner.block_op_seconds(kind, num_bytes)

    def step_started(self, seconds: float, prefill_tokens: int = 0) -> float:
        return self.inner.step_started(seconds, prefill_tokens)

    def fixed_seconds(self) -> float:
        return self.inner.fixed_seconds()


class Jittered(Wrapped):
    """Another cost model's step times, each times exp(sigma * N(0, 1)) from a generator of its own (one per
    replica: the draws do not depend on how replicas interleave). Real steps of one shape vary by a few percent
    on a CPU; with several replicas that variation decides the router's ties, and so where requests go."""

    def __init__(self, inner: CostModel, sigma: float, seed: int):
        super().__init__(inner)
        self.sigma, self.rng = sigma, random.Random(seed)

    def step_seconds(self, decode_rows, prefill_tokens, decode_context, prefill_pairs):
        return self.inner.step_seconds(decode_rows, prefill_tokens, decode_context, prefill_pairs) * math.exp(
            self.sigma * self.rng.gauss(0.0, 1.0))


class SharedMachine:
    """The replicas of one machine (profile.replicas_per_machine of them): when each one's current step ends,
    and its kind (step_kind)."""

    def __init__(self, size: int, slowdown: float, by_kind: dict | None = None):
        self.busy_until, self.kinds = [-math.inf] * size, ["decode"] * size
        self.slowdown, self.by_kind = slowdown, by_kind or {}

    def factor(self, own: str, neighbour: str) -> float:
        return self.by_kind.get(own, {}).get(neighbour, self.slowdown)


class OnSharedMachine(Wrapped):
    """Another cost model, for one replica of a SharedMachine: a step of kind a that starts while others of
    the machine's n - 1 other replicas are stepping takes 1 + sum over them of (slowdown(a, b) - 1) / (n - 1)
    times as long, b each one's step kind (they share the memory bandwidth and caches; slowdown(a, b) was
    measured with both stepping: corun_by_kind, else corun_slowdown). Priced at its start: a neighbour's step
    that starts later does not slow it. With the profile's corun_part "fixed", a decode-only step takes that
    sum / (n - 1) times its model's fixed cost longer instead (a step with prompt tokens is slowed as a whole)."""

    def __init__(self, inner: CostModel, machine: SharedMachine, slot: int, clock):
        super().__init__(inner)
        self.machine, self.slot, self.clock = machine, slot, clock
        self.fixed = inner.fixed_seconds() if inner.profile.corun_part == "fixed" else None

    def step_started(self, seconds: float, prefill_tokens: int = 0) -> float:
        now, m = self.clock(), self.machine
        own = step_kind(prefill_tokens)
        extra = sum(m.factor(own, m.kinds[j]) - 1.0 for j, t in enumerate(m.busy_until) if t > now and j != self.slot)
        extra /= len(m.busy_until) - 1
        if self.fixed is not None and own == "decode":    # its weights' read slows, whatever its rows
            seconds += extra * self.fixed
        else:
            seconds *= 1.0 + extra
        m.busy_until[self.slot], m.kinds[self.slot] = now + seconds, own
        return seconds


def replica_cost(cost: CostModel, index: int, clock, machines: dict, step_noise: float = 0.0,
                 seed: int | None = None) -> CostModel:
    """Replica `index`'s step times: `cost`, jittered by a generator of its own (`step_noise`: Jittered), and
    slower beside the other replicas of its machine when the profile puts n > 1 on one (replicas i // n share
    machine i, kept in `machines`: OnSharedMachine)."""
    if step_noise:
        cost = Jittered(cost, step_noise, (seed or 0) * 1_000_003 + index)
    n = cost.profile.replicas_per_machine
    if n > 1:
        machine = machines.setdefault(index // n, SharedMachine(n, cost.profile.corun_slowdown,
                                                                cost.profile.corun_by_kind))
        cost = OnSharedMachine(cost, machine, index % n, clock)
    return cost


def time_ratio(profile: HardwareProfile, steps) -> float:
    """The measured `steps`' ((shape, seconds, ...)) total time over `profile`'s price of them (1.0: none): the
    figure a simulation's sums meet. A step's time on a shared CPU has a long right tail, and a request's TPOT
    is the mean of its steps': a median (step_ratio) prices them short (by 10-13% of the decodes' total time in
    two-replica runs on a Zen 4)."""
    if not steps:
        return 1.0
    model = profile.cost_model()
    return sum(s[1] for s in steps) / sum(model.step_seconds(*s[0]) for s in steps)


def step_ratio(profile: HardwareProfile, steps) -> float:
    """The median over measured `steps` ((shape, seconds, ...)) of their time over `profile`'s (1.0: none)."""
    if not steps:
        return 1.0
    model = profile.cost_model()
    return statistics.median(s[1] / model.step_seconds(*s[0]) for s in steps)


STEP_KINDS = ("decode", "prefill")
CORUN_PARTS = ("step", "fixed")      # HardwareProfile.corun_part


def step_kind(prefill_tokens: int) -> str:
    """A step's kind (STEP_KINDS) by its prefill tokens (SchedulerOutput.shape()'s second number): "prefill" when it computes
    any prompt tokens, else "decode"."""
    return "prefill" if prefill_tokens else "decode"


def roofline_profile(gpu: str, model: dict = SMOLLM2_135M, dtype: str = "bfloat16", mfu: float = 0.5,
                     bw_efficiency: float = 0.8, launch_s: float | None = None) -> HardwareProfile:
    """A GPU's profile from its roofline (datasheet numbers in GPU_SPECS, efficiencies assumed)."""
    if gpu not in GPU_SPECS:
        raise ValueError(f"gpu must be one of {', '.join(GPU_SPECS)}, got {gpu!r}")
    spec = GPU_SPECS[gpu]
    weight_bytes = model["num_params"] * DTYPE_BYTES[dtype]
    launch = launch_s if launch_s is not None else 1e-3 + model["num_layers"] * 8 * 3e-6   # ~8 kernels/layer
    return HardwareProfile(
        name=f"{gpu}-{model['name']}-{dtype}", kind="roofline",
        source=(f"roofline, not measured: {gpu.upper()} datasheet peak {spec['peak_flops'] / 1e12:.0f} TFLOP/s dense "
                f"bf16 x mfu {mfu}, HBM {spec['mem_bytes_per_s'] / 1e12:.2f} TB/s x efficiency {bw_efficiency}, "
                f"launch overhead {launch * 1e3:.2f} ms per step; KV budget 90% of memory left after the weights; "
                f"P/D link {spec['link_bytes_per_s'] / 1e9:.0f} GB/s; cold start: weights at 2 GB/s + 10 s"),
        model=dict(model), dtype=dtype,
        params=dict(peak_flops=spec["peak_flops"], mem_bytes_per_s=spec["mem_bytes_per_s"], mfu=mfu,
                    bw_efficiency=bw_efficiency, launch_s=launch),
        kv_cache_bytes=int(0.9 * (spec["mem_bytes"] - weight_bytes)), link_bytes_per_s=spec["link_bytes_per_s"],
        swap_bytes_per_s=25e9, cold_start_s=round(10.0 + weight_bytes / 2e9, 3))
