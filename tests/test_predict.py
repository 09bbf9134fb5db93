"""Output-length prediction (kvflow/predict): the estimate's arithmetic, the online predictor, the metrics,
the learned predictor's training and file, the prompt set; and one end-to-end feature collection on a
tiny model."""
import math
import subprocess
import sys

import numpy as np
import pytest

from kvflow.predict.base import EDGES, LengthEstimate, bucket_of, make_predictor
from kvflow.predict.learned import LearnedPredictor, fit
from kvflow.predict.online import OnlinePredictor
from kvflow.predict.prompts import TEST_TOPICS, TRAIN_TOPICS, make_items, make_prompts
from kvflow.predict.train import bucket_accuracy, evaluate, kendall_tau

K = len(EDGES) - 1

# ---- LengthEstimate ------------------------------------------------------------------------------


def test_estimate_mean_remaining_and_conditioning():
    est = LengthEstimate.point(100)                        # all mass in [64, 128): mean 96
    assert est.bucket() == bucket_of(100) == 3
    assert est.mean() == pytest.approx(96)
    assert est.remaining(80) == pytest.approx((80 + 128) / 2 - 80)   # conditioned on > 80: uniform on [80, 128)
    assert est.mean(cap=90) == pytest.approx(90)
    probs = [0.0] * K
    probs[0], probs[5] = 0.5, 0.5                          # [1, 16) and [256, 512)
    est = LengthEstimate(probs)
    assert est.mean() == pytest.approx(0.5 * 8.5 + 0.5 * 384)
    assert est.remaining(20) == pytest.approx(384 - 20)    # the short bucket is ruled out
    assert est.remaining(600) == pytest.approx(600)        # outlived every bucket: as much again
    with pytest.raises(ValueError):
        LengthEstimate([1.0])


# ---- the online predictor --------------------------------------------------------------------------


def test_online_prior_then_learns_per_client_and_prompt_length():
    p = make_predictor("online")
    assert isinstance(p, OnlinePredictor) and p.features == ()
    prior = p.predict(50, None, {})
    assert 16 <= prior.mean() <= 512 and sum(prior.probs) == pytest.approx(1)
    for _ in range(20):
        p.observe(50, "chatty", 700)      # a client with long answers
        p.observe(50, "terse", 3)         # and one with one-word answers
        p.observe(2000, None, 40)         # long prompts without a client: ~40 tokens
    assert p.predict(50, "chatty", {}).bucket() == bucket_of(700)
    assert p.predict(50, "terse", {}).bucket() == bucket_of(3)
    assert p.predict(2000, None, {}).bucket() == bucket_of(40)
    assert p.predict(2000, "new client", {}).bucket() == bucket_of(40)     # falls back to the prompt length
    assert p.predict(50, "chatty", {}).mean() > 10 * p.predict(50, "terse", {}).mean()


def test_online_decay_follows_a_changing_client():
    p = OnlinePredictor(decay=0.9)
    for _ in range(30):
        p.observe(10, "c", 5)
    for _ in range(30):
        p.observe(10, "c", 300)
    assert p.predict(10, "c", {}).bucket() == bucket_of(300)


def test_online_forgets_least_recent_client():
    p = OnlinePredictor(max_clients=2)
    for c in ("a", "b", "a", "c"):
        p.observe(10, c, 5)
    assert set(p.by_client) == {"a", "c"}


# ---- metrics -----------------------------------------------------------------------------------------


def test_kendall_tau_hand_computed():
    # pairs of (1,2,3,4) vs (1,3,2,4): 5 concordant, 1 discordant -> (5 - 1) / 6
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)
    # tau-b with a tie in x: x = (1, 1, 2), y = (1, 2, 3): concordant 2, discordant 0, tied-in-x 1
    assert kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(2 * 3))
    assert math.isnan(kendall_tau([5, 5, 5], [1, 2, 3]))
    rng = np.random.default_rng(0)     # blocked computation agrees with the plain double loop
    x, y = rng.integers(0, 20, 700), rng.integers(0, 20, 700)
    s = sum(np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i in range(60) for j in range(i))
    nx = sum(x[i] != x[j] for i in range(60) for j in range(i))
    ny = sum(y[i] != y[j] for i in range(60) for j in range(i))
    assert kendall_tau(x[:60], y[:60]) == pytest.approx(s / math.sqrt(nx * ny))
    assert -0.1 < kendall_tau(x, y) < 0.1


def test_bucket_accuracy_and_evaluate():
    assert bucket_accuracy([0, 3, 5], [10, 100, 100]) == pytest.approx(2 / 3)
    assert bucket_accuracy([0, 3, 5], [10, 100, 100], within=1) == pytest.approx(2 / 3)
    assert bucket_accuracy([0, 3, 4], [10, 100, 100], within=1) == pytest.approx(1)
    r = evaluate([LengthEstimate.point(n) for n in (5, 50, 500)], [4, 60, 600], cap=1024)
    assert r["tau"] == pytest.approx(1) and r["acc"] == pytest.approx(2 / 3) and r["acc1"] == pytest.approx(1)
    assert evaluate([10, 20], [10, 20])["acc"] == 1.0


# ---- the learned predictor -----------------------------------------------------------------------


def _synthetic(n, seed, d=16):
    """Features whose first coordinates decide the output length (log-uniform 2..1000)."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(0, 1, n)
    lengths = np.round(2 * 500 ** z).astype(int)
    embed = rng.normal(size=(n, d)).astype(np.float32)
    embed[:, 0] = z + 0.3 * rng.normal(size=n)             # a noisy view before the prefill
    hidden = rng.normal(size=(n, d)).astype(np.float32)
    hidden[:, 0], hidden[:, 1] = 3 * z, -z                 # a clean one after it
    return embed, hidden, lengths, rng.integers(10, 200, n)


IDENTITY = {"model": "tiny.gguf", "model_type": "llama", "hidden_size": 16, "num_layers": 2, "vocab_size": 512}


@pytest.fixture(scope="module")
def trained():
    e, h, n, pl = _synthetic(600, 0)
    return fit(e, h, n, pl, epochs=150, seed=0, identity=IDENTITY, meta={"note": "synthetic"},
               extras={"train_lengths": n})


def test_learned_fit_save_load_predict(trained, tmp_path):
    e, h, n, pl = _synthetic(200, 1)
    path = str(tmp_path / "p.npz")
    trained.save(path)
    loaded = LearnedPredictor.load(path, IDENTITY)
    assert loaded.features == ("embed", "hidden") and loaded.meta["note"] == "synthetic"
    assert loaded.identity == IDENTITY and loaded.extras["train_lengths"].shape == (600,)
    hidden_est = [loaded.predict(int(p), None, {"embed": a, "hidden": b}) for a, b, p in zip(e, h, pl)]
    embed_est = [loaded.predict(int(p), None, {"embed": a}) for a, p in zip(e, pl)]
    assert all(sum(x.probs) == pytest.approx(1) for x in hidden_est[:5])
    assert hidden_est[0].probs == trained.predict(int(pl[0]), None, {"embed": e[0], "hidden": h[0]}).probs
    tau_hidden = evaluate(hidden_est, n)["tau"]
    tau_embed = evaluate(embed_est, n)["tau"]
    assert tau_hidden > 0.5 and tau_embed > 0.3 and tau_hidden > tau_embed
    assert make_predictor(path, IDENTITY).heads.keys() == {"embed", "hidden"}
    assert sum(loaded.predict(10, None, {}).probs) == pytest.approx(1)      # no features: the prior
    # deterministic for a seed
    one, two = (fit(*_synthetic(100, 0), epochs=20, seed=3) for _ in range(2))
    assert np.array_equal(one.heads["hidden"].w1, two.heads["hidden"].w1)


def test_learned_file_errors(trained, tmp_path):
    path = str(tmp_path / "p.npz")
    with pytest.raises(FileNotFoundError, match="p.npz"):
        LearnedPredictor.load(path, None)
    trained.save(path)
    other = dict(IDENTITY, model="other-model.gguf")
    with pytest.raises(ValueError, match="tiny.gguf.*other-model.gguf"):
        LearnedPredictor.load(path, other)
    assert LearnedPredictor.load(path, None).identity == IDENTITY       # no check without an identity
    data = open(path, "rb").read()
    for name, content in [("truncated.npz", data[:len(data) // 2]), ("garbage.npz", b"not a zip at all" * 10),
                          ("empty.npz", b"")]:
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(ValueError, match="is not a kvflow length predictor file"):
            LearnedPredictor.load(str(bad), None)
    np.savez(tmp_path / "foreign.npz", meta=np.array('{"format": "something else"}'), x=np.zeros(3))
    with pytest.raises(ValueError, match="is not a kvflow length predictor file"):
        LearnedPredictor.load(str(tmp_path / "foreign.npz"), None)
    np.save(tmp_path / "array.npy", np.zeros(3))
    with pytest.raises(ValueError, match="is not a kvflow length predictor file"):
        LearnedPredictor.load(str(tmp_path / "array.npy"), None)


def test_scheduler_side_modules_do_not_import_torch():
    code = ("import sys; import kvflow.predict.learned, kvflow.predict.online, kvflow.predict.prompts; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- the prompt set ---------------------------------------------------------------------------------


def test_prompts_deterministic_disjoint_and_mixed():
    assert not set(TRAIN_TOPICS) & set(TEST_TOPICS)
    a, b = make_items(200, 3, "train"), make_items(200, 3, "train")
    assert a == b and make_prompts(200, 3, "train") == [it.messages for it in a]
    assert make_items(50, 4, "train") != make_items(50, 3, "train")[:50]
    test = make_items(200, 3, "test")
    assert {it.topic for it in test} <= set(TEST_TOPICS) and {it.topic for it in a} <= set(TRAIN_TOPICS)
    kinds = [it.kind for it in a]
    assert {"short", "medium", "long"} == set(kinds) and 40 < kinds.count("long") < 120
    assert len({it.text for it in a}) == 200                 # no repeats before the pairs run out
    assert a[0].messages[0]["role"] == "user" and a[0].topic in a[0].text
    assert all(it.kind == "short" for it in make_items(20, 0, "test", kinds={"short": 1.0}))
    with pytest.raises(ValueError):
        make_items(3, 0, "validation")


# ---- end to end on a tiny model ------------------------------------------------------------------


def test_collect_features_end_to_end(tiny_model_dir):
    from kvflow.entrypoints.llm import LLM
    from kvflow.predict.train import collect
    llm = LLM(model=tiny_model_dir("llama_gqa"), dtype="float32", block_size=8)
    if not hasattr(llm.engine.core, "features_log"):
        pytest.skip("EngineCore.features_log (feature collection) is not in the engine core yet")
    items = make_items(6, 0, "train")
    items += items[:2]                     # sampled twice (another seed), as the oracle is: prefix-cache hits
    data = collect(llm, items, max_tokens=12, temperature=1.0, seed=[0] * 6 + [1] * 2)
    assert data["embed"].shape == data["hidden"].shape == (8, 64)
    assert np.array_equal(data["embed"][6:], data["embed"][:2])
    assert np.allclose(data["hidden"][6:], data["hidden"][:2], atol=1e-4)
    assert data["embed"].dtype == np.float32 and np.isfinite(data["hidden"]).all()
    assert ((1 <= data["lengths"]) & (data["lengths"] <= 12)).all()
    assert (data["lengths"][data["censored"]] == 12).all()
    assert llm.engine.core.features_log is None
    p = fit(data["embed"], data["hidden"], data["lengths"], data["prompt_lens"], epochs=5)
    assert sum(p.predict(10, None, {"embed": data["embed"][0]}).probs) == pytest.approx(1)
