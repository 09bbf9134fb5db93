"""The recent history the web page's dashboard shows (GET /stats, routes_web.py), kept in bounded buffers:
the last finished requests (its timeline), their TTFT and TPOT over the last minutes (its charts), and
prompt / generated tokens per second.

Fed by ServerMetrics.record_output with every finished request, on the event loop (no lock needed).
Token rates come from finished requests only: a request's generated tokens are spread evenly over its
decode span, its prompt tokens counted in the second its first token came out; a long request still
running shows once it ends. Times are the engine's time.monotonic(); `snapshot` gives them as seconds
relative to now (negative: in the past) so that a browser needs no clock of ours.
"""
from __future__ import annotations

import collections
import math
import time

from kvflow.outputs import RequestOutput

MAX_REQUESTS = 200          # timeline entries kept
WINDOW_S = 300.0            # TTFT / TPOT points and token buckets kept: the last 5 minutes
MAX_LATENCY_POINTS = 1000     # at most ~30 KB of the 2-per-second JSON
RATE_WINDOW_S = 5.0         # "tokens/s now" averages the last 5 seconds


class RequestLog:
    def __init__(self, max_requests: int = MAX_REQUESTS, window_s: float = WINDOW_S):
        self.window_s = window_s
        self.requests: collections.deque[dict] = collections.deque(maxlen=max_requests)
        self.latency: collections.deque[tuple] = collections.deque(maxlen=MAX_LATENCY_POINTS)  # (end, ttft, tpot)
        self.buckets: dict[int, list[float]] = {}   # whole second -> [prompt tokens, generated tokens]
        self.num_finished = 0

    def _add(self, t: float, prompt: float, gen: float) -> None:
        b = self.buckets.setdefault(math.floor(t), [0.0, 0.0])
        b[0] += prompt
        b[1] += gen

    def record(self, out: RequestOutput) -> None:
        m = out.metrics
        self.num_finished += 1
        num_out = max((len(c.token_ids) for c in out.outputs), default=0)
        total_out = sum(len(c.token_ids) for c in out.outputs)
        now = time.monotonic()
        end = m.finished_time if m is not None and m.finished_time is not None else now
        first = m.first_token_time if m is not None else None
        self.requests.append({
            "id": out.request_id, "arrival": m.arrival_time if m else end,
            "scheduled": m.first_scheduled_time if m else None, "first_token": first, "finished": end,
            "prompt_tokens": len(out.prompt_token_ids), "cached_tokens": max(out.num_cached_tokens, 0),
            "output_tokens": total_out, "preemptions": m.num_preemptions if m else 0,
            "priority": m.priority if m else 0, "finish_reason": out.finish_reason or "abort"})
        if first is None:
            self._add(end, len(out.prompt_token_ids), total_out)
        else:
            self._add(first, len(out.prompt_token_ids), 0)
            # spread the generated tokens over the decode span, second by second
            span = end - first
            if span <= 0 or total_out <= 1:
                self._add(end, 0, total_out)
            else:
                t = first
                while t < end:
                    step = min(math.floor(t) + 1, end) - t
                    self._add(t, 0, total_out * step / span)
                    t += step
            ttft = first - m.arrival_time
            tpot = (end - first) / (num_out - 1) if num_out > 1 else None
            self.latency.append((end, ttft, tpot))
        self._prune(now)

    def _prune(self, now: float) -> None:
        horizon = now - self.window_s
        while self.latency and self.latency[0][0] < horizon:
            self.latency.popleft()
        for sec in [s for s in self.buckets if s < horizon - 1]:
            del self.buckets[sec]

    def snapshot(self, max_requests: int = 60) -> dict:
        """Plain JSON: rates now, the per-second token series, latency points and the last requests."""
        now = time.monotonic()
        self._prune(now)

        def rel(t):
            return None if t is None else round(t - now, 4)
        start = math.floor(now - RATE_WINDOW_S)
        recent = [self.buckets.get(s, (0.0, 0.0)) for s in range(start, math.floor(now) + 1)]
        # the window: the whole seconds before this one and the part of this one gone by
        span = now - start if now - start > 0 else 1.0
        reqs = list(self.requests)[-max_requests:]
        return {
            "prompt_tokens_per_s": round(sum(b[0] for b in recent) / span, 2),
            "generation_tokens_per_s": round(sum(b[1] for b in recent) / span, 2),
            "tokens_per_s": [[rel(s), round(b[0], 2), round(b[1], 2)] for s, b in sorted(self.buckets.items())],
            "latency": [[rel(end), round(ttft, 5), None if tpot is None else round(tpot, 5)]
                        for end, ttft, tpot in self.latency],
            "requests": [{**r, **{k: rel(r[k]) for k in ("arrival", "scheduled", "first_token", "finished")}}
                         for r in reqs],
            "num_finished": self.num_finished,
            "window_s": self.window_s,
        }
