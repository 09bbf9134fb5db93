"""The built-in web page (`kvflow serve` prints its address): a chat playground and a live engine dashboard.

GET / serves the page and GET /ui/<name> its few assets, all shipped in kvflow/entrypoints/web/ (no CDN:
it works offline); both are open, like /docs, since they hold no data. GET /stats is the dashboard's JSON,
behind the API key like /v1. Nothing here changes engine state: every route is a GET that only reads.
The page itself talks to the server through the OpenAI routes and /stats only, so it works the same
for one engine or many replicas.
"""
from __future__ import annotations

import dataclasses
import time
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from kvflow import __version__
from kvflow.entrypoints.responses import error_response
from kvflow.entrypoints.serving import ServingDep

router = APIRouter()          # the page and its assets: open
keyed_router = APIRouter()    # GET /stats: behind the API key

ASSETS = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "chart.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
# the page builds its DOM with textContent only; this policy is a second line: no inline script, nothing
# loaded from elsewhere, so that even a slip could not run a model's `<script>`
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_cache: dict[str, bytes] = {}


def asset(name: str) -> bytes:
    if name not in _cache:
        _cache[name] = resources.files("kvflow.entrypoints").joinpath("web", name).read_bytes()
    return _cache[name]


def page_size() -> int:
    """The page's size in bytes: every asset it loads, uncompressed."""
    return sum(len(asset(name)) for name in ASSETS)


def page_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else "[::1]" if host == "::" else \
        f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def _serve(name: str) -> Response:
    return Response(asset(name), media_type=ASSETS[name],
                    headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                             "Content-Security-Policy": CSP, "Referrer-Policy": "no-referrer"})


@router.get("/", include_in_schema=False)
async def page():
    return _serve("index.html")


@router.get("/ui/{name}", include_in_schema=False)
async def ui_asset(name: str):
    if name not in ASSETS:
        return error_response(f"no such asset: {name}", 404)
    return _serve(name)


def _plain(x):
    """Replica entries as plain JSON (a dataclass inside becomes a dict)."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _plain(dataclasses.asdict(x))
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x if isinstance(x, (str, int, float, bool, type(None))) else str(x)


@keyed_router.get("/stats")
async def stats(serving: ServingDep):
    """The dashboard's numbers, read-only: the engine's latest EngineStats (with the prefix-cache hit
    rate), its health, token rates, TTFT / TPOT of the last minutes and the last requests' timeline
    (times in seconds relative to now), and with many replicas `replicas` (one entry each) and `router`
    (its policy, decisions, mean cost, resumes, migrations and its last choices)."""
    engine = serving.engine
    s = engine.stats
    health = "ok" if engine.is_healthy else "restarting" if engine.fatal is None else "dead"
    body = {
        "model": serving.model_name, "version": __version__, "time": time.time(), "health": health,
        "max_model_len": engine.max_model_len,
        "engine": {**_plain(s), "prefix_cache_hit_rate":
                   s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0},
        **serving.metrics.recent.snapshot(),
        "replicas": _plain(list(getattr(engine, "replica_stats", None) or [])),
        "router": _plain(getattr(engine, "router_stats", None)),   # its policy, cost, recent choices
    }
    return JSONResponse(body, headers={"Cache-Control": "no-store"})
