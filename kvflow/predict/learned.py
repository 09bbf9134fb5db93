"""The learned output-length predictor: two small classifiers over the model's own activations.

  "embed" head:  reads the mean of the prompt's input embeddings (known before the prefill);
  "hidden" head: reads the final hidden state of the last prompt token (known after the prefill).
Each head standardises its input, then runs an MLP D -> 64 -> K (ReLU) giving logits over the K output-
length buckets of base.EDGES; the estimate is their softmax. Optionally (when trained with prompt
lengths) both heads also read log(1 + prompt length).

Inference is numpy only: importing this module does not import torch (the scheduler side stays
torch-free). `fit` trains both heads with torch, imported inside it.

The file (`save` / `load`) is one .npz without pickled objects: the weights as float32 arrays, the
bucket edges, and a JSON string with the format tag, the identity of the model the predictor was
trained for (base.model_identity) and the training metadata. Extra arrays (e.g. the training set's
output and prompt lengths, which the evaluation's baselines are fitted on) may be stored with it.
"""
from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from kvflow.predict.base import EDGES, LengthEstimate, LengthPredictor, bucket_of

FORMAT = "kvflow-length-predictor"
VERSION = 1
HEADS = ("embed", "hidden")
PARAMS = ("mu", "sigma", "w1", "b1", "w2", "b2")


class Head:
    """One MLP: standardise, Linear(D, H), ReLU, Linear(H, K)."""

    def __init__(self, mu, sigma, w1, b1, w2, b2):
        self.mu, self.sigma, self.w1, self.b1, self.w2, self.b2 = (np.asarray(a, np.float32)
                                                                   for a in (mu, sigma, w1, b1, w2, b2))
        d, h = self.w1.shape
        if (self.mu.shape != (d,) or self.sigma.shape != (d,) or self.b1.shape != (h,)
                or self.w2.shape[0] != h or self.b2.shape != (self.w2.shape[1],)):
            raise ValueError("inconsistent head shapes")

    @property
    def input_size(self) -> int:
        return self.w1.shape[0]

    def probs(self, x: np.ndarray) -> np.ndarray:
        """Bucket probabilities for inputs x [N, D] (or [D]): [N, K] (or [K])."""
        z = (np.asarray(x, np.float32) - self.mu) / self.sigma
        logits = np.maximum(z @ self.w1 + self.b1, 0.0) @ self.w2 + self.b2
        logits = logits - logits.max(axis=-1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=-1, keepdims=True)


class LearnedPredictor(LengthPredictor):
    """Bucket classifiers over the "embed" and "hidden" features (see the module docstring)."""
    name = "learned"
    features = ("embed", "hidden")

    def __init__(self, heads: dict[str, Head], edges: tuple[float, ...] = EDGES, identity: dict | None = None,
                 meta: dict | None = None, prior: np.ndarray | None = None, use_prompt_len: bool = False,
                 extras: dict[str, np.ndarray] | None = None):
        self.heads, self.edges, self.identity = heads, tuple(edges), identity
        self.meta = meta or {}
        k = len(self.edges) - 1
        self.prior = np.full(k, 1.0 / k) if prior is None else np.asarray(prior, np.float64)
        self.use_prompt_len = use_prompt_len
        self.extras = extras or {}

    def _input(self, x: np.ndarray, prompt_len) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if not self.use_prompt_len:
            return x
        pl = np.log1p(np.asarray(prompt_len, np.float32))
        return np.concatenate([x, pl[..., None]], axis=-1) if x.ndim > 1 else np.append(x, pl)

    def predict(self, prompt_len: int, client: str | None, features: dict[str, np.ndarray]) -> LengthEstimate:
        """The hidden head when "hidden" is given, else the embed head; neither: the training set's
        bucket frequencies."""
        for name in ("hidden", "embed"):
            if features.get(name) is not None and name in self.heads:
                p = self.heads[name].probs(self._input(features[name], prompt_len))
                return LengthEstimate(p.astype(np.float64).tolist(), self.edges)
        return LengthEstimate(self.prior.tolist(), self.edges)

    def predict_batch(self, head: str, x: np.ndarray, prompt_lens: np.ndarray) -> np.ndarray:
        """Bucket probabilities [N, K] of one head for N requests."""
        return self.heads[head].probs(self._input(x, prompt_lens))

    # ---- the file ----------------------------------------------------------------------------------

    def save(self, path: str) -> None:
        arrays = {f"{h}_{p}": getattr(head, p) for h, head in self.heads.items() for p in PARAMS}
        meta = {"format": FORMAT, "version": VERSION, "heads": sorted(self.heads), "identity": self.identity,
                "use_prompt_len": self.use_prompt_len, "training": self.meta}
        arrays.update({f"extra_{k}": np.asarray(v) for k, v in self.extras.items()})
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        tmp = path + ".tmp.npz"          # written whole, then renamed: never a half-written file
        np.savez(tmp, meta=np.array(json.dumps(meta)), edges=np.array(self.edges, np.float64),
                 prior=self.prior, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str, model_identity: dict | None) -> LearnedPredictor:
        """Open a file written by `save`. FileNotFoundError if it is missing; ValueError if it is not such
        a file, or if it was trained for another model than `model_identity` (None: not checked)."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"length predictor file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"][()]))
                if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                    raise ValueError(f"no {FORMAT!r} format tag")
                if meta.get("version") != VERSION:
                    raise ValueError(f"version {meta.get('version')!r}, this kvflow reads version {VERSION}")
                edges = tuple(float(e) for e in z["edges"])
                heads = {h: Head(*(z[f"{h}_{p}"] for p in PARAMS)) for h in meta["heads"]}
                prior = np.asarray(z["prior"], np.float64)
                extras = {k[len("extra_"):]: np.asarray(z[k]) for k in z.files if k.startswith("extra_")}
            if not heads or any(hd.w2.shape[1] != len(edges) - 1 for hd in heads.values()) \
                    or prior.shape != (len(edges) - 1,):
                raise ValueError("the heads do not match the bucket edges")
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, EOFError,
                zipfile.BadZipFile) as e:
            raise ValueError(f"{path} is not a kvflow length predictor file ({type(e).__name__}: {e})") from None
        identity = meta.get("identity")
        if model_identity is not None and identity != model_identity:
            trained = (identity or {}).get("model", "an unknown model")
            raise ValueError(f"{path} was trained for model {trained} ({identity}), not for model "
                             f"{model_identity.get('model')} ({model_identity})")
        return cls(heads, edges, identity, meta.get("training") or {}, prior, bool(meta.get("use_prompt_len")),
                   extras)


# ---- training ---------------------------------------------------------------------------------------

def fit(X_embed: np.ndarray | None, X_hidden: np.ndarray | None, lengths, prompt_lens=None, *,
        edges: tuple[float, ...] = EDGES, hidden_units: int = 64, epochs: int = 100, lr: float = 1e-3,
        weight_decay: float = 1e-2, label_smoothing: float = 0.05, seed: int = 0,
        identity: dict | None = None, meta: dict | None = None,
        extras: dict[str, np.ndarray] | None = None) -> LearnedPredictor:
    """Train the two heads (either input may be None to skip its head) by full-batch AdamW on the cross-
    entropy of the output-length buckets. Lengths cut at max_tokens are given as max_tokens: the bucket
    that holds max_tokens stands for "at least this long". With `prompt_lens`, both heads also read
    log(1 + prompt length). Deterministic for a given seed; seconds for a few thousand requests.
    The defaults (few, small steps: an early stop) won a 5-fold cross-validation on 300 SmolLM2 training
    requests (tau 0.61 against 0.52-0.55 for 300 epochs at lr 3e-3: more steps overfit so few samples)."""
    import torch

    lengths = np.asarray(lengths)
    y = np.array([bucket_of(float(n), edges) for n in lengths])
    k = len(edges) - 1
    prior = np.bincount(y, minlength=k) + 1.0
    prior = prior / prior.sum()
    use_pl = prompt_lens is not None
    pl = np.log1p(np.asarray(prompt_lens, np.float32))[:, None] if use_pl else None
    heads = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # tiny matrices: threads only add overhead (and stall on a busy machine)
    try:
        for name, X in (("embed", X_embed), ("hidden", X_hidden)):
            if X is None:
                continue
            X = np.asarray(X, np.float32)
            if use_pl:
                X = np.concatenate([X, pl], axis=1)
            if len(X) != len(y):
                raise ValueError(f"{name}: {len(X)} feature rows for {len(y)} lengths")
            heads[name] = _fit_head(torch, X, y, k, hidden_units, epochs, lr, weight_decay, label_smoothing, seed)
    finally:
        torch.set_num_threads(threads)
    training = dict(meta or {}, num_samples=int(len(y)), epochs=epochs, lr=lr, weight_decay=weight_decay,
                    hidden_units=hidden_units, label_smoothing=label_smoothing, seed=seed)
    return LearnedPredictor(heads, edges, identity, training, prior, use_pl, extras)


def _fit_head(torch, X: np.ndarray, y: np.ndarray, k: int, hidden_units: int, epochs: int, lr: float,
              weight_decay: float, label_smoothing: float, seed: int) -> Head:
    mu = X.mean(axis=0)
    sigma = X.std(axis=0) + 1e-4
    gen = torch.Generator().manual_seed(seed)
    d = X.shape[1]
    w1 = (torch.randn(d, hidden_units, generator=gen) / d ** 0.5).requires_grad_()
    b1 = torch.zeros(hidden_units, requires_grad=True)
    w2 = (torch.randn(hidden_units, k, generator=gen) / hidden_units ** 0.5).requires_grad_()
    b2 = torch.zeros(k, requires_grad=True)
    xt = torch.from_numpy((X - mu) / sigma).float()
    yt = torch.from_numpy(y).long()
    params = [w1, b1, w2, b2]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    beta1, beta2 = 0.9, 0.999
    for step in range(1, epochs + 1):
        logits = torch.relu(xt @ w1 + b1) @ w2 + b2
        loss = torch.nn.functional.cross_entropy(logits, yt, label_smoothing=label_smoothing)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():       # AdamW, written out (torch.optim's first use costs seconds of imports)
            for p, g, m_, v_ in zip(params, grads, m, v):
                p.mul_(1 - lr * weight_decay)
                m_.mul_(beta1).add_(g, alpha=1 - beta1)
                v_.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v_ / (1 - beta2 ** step)).sqrt_().add_(1e-8)
                p.addcdiv_(m_, denom, value=-lr / (1 - beta1 ** step))
    return Head(mu, sigma, *(t.detach().numpy() for t in (w1, b1, w2, b2)))
