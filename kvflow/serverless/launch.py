"""`kvflow serve --serverless`: the OpenAI-compatible server (kvflow/entrypoints/api_server.py, unchanged
routes) in front of the Ray Serve application of app.py, through ServeClient.

`ServerlessLLM` is AsyncLLM with ServeClient as its engine-core client, and one addition: a request that
waited `scale_up_timeout_s` for a replica fails with QueueFullError, which the server answers with 503 and
Retry-After. GET /v1/serverless returns the serverless metrics (metrics.py); /metrics adds them as
kvflow:serverless_* series.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal

import kvflow.engine.async_llm as async_llm
from kvflow.engine.async_llm import AsyncLLM, QueueFullError

logger = logging.getLogger("kvflow")


def _make_client(rc):
    if rc.config.serverless.serverless:
        from kvflow.serverless.client import ServeClient
        return ServeClient(rc)
    return _make_client.original(rc)


def install() -> None:
    """Make AsyncLLM build a ServeClient for a serverless config (the other configs are unchanged).
    (kvflow/engine/async_llm.py `make_client` has no serverless branch yet; this adds it.)"""
    if async_llm.make_client is not _make_client:
        _make_client.original = async_llm.make_client
        async_llm.make_client = _make_client


class ServerlessLLM(AsyncLLM):
    def __init__(self, config, *args, **kwargs):
        if not config.serverless.serverless:
            raise ValueError("ServerlessLLM needs a serverless config (serverless=True)")
        install()
        super().__init__(config, *args, **kwargs)
        self.num_replicas = config.serverless.max_replicas      # batch slots: the fleet at its largest

    async def start(self, timeout: float = 600.0) -> None:
        self.client.refuse = self._refuse
        await super().start(timeout)

    def _refuse(self, core_request_id: str, why: str, retry_after: int) -> None:
        child = self.output_processor.children.get(core_request_id)
        parent_id = child.parent.request_id if child is not None else core_request_id
        stream = self.streams.get(parent_id)
        for cid in self.output_processor.abort(parent_id):
            if cid != core_request_id:
                self.client.abort_requests([cid])
        if stream is not None:
            stream.fail(QueueFullError(why, retry_after))

    def serverless_stats(self) -> dict:
        return self.client.serverless_stats()


async def serve_serverless(engine_config, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                           served_model_name: str | None = None, max_queue_len: int = 256,
                           drain_timeout: float = 30.0, log_level: str = "warning", max_body_bytes: int | None = None,
                           keepalive_s: float | None = None, max_engine_restarts: int = 3,
                           max_wait_s: float | None = None) -> int:
    """api_server.serve for a serverless config: the same server, its engine on Ray Serve."""
    import uvicorn

    from kvflow.entrypoints import api_server
    from kvflow.entrypoints.metrics import ServerMetrics
    from kvflow.serverless.metrics import ServerlessCollector
    engine = ServerlessLLM(engine_config, max_queue_len, max_engine_restarts=max_engine_restarts)
    name = served_model_name or os.path.basename(engine.model_path.rstrip("/")).removesuffix(".gguf")
    metrics = ServerMetrics(name)
    engine.on_output, engine.on_stats = metrics.record_output, metrics.record_stats
    await engine.start()
    app = api_server.build_app(engine, name, metrics, api_key, max_body_bytes or api_server.MAX_BODY_BYTES,
                               api_server.KEEPALIVE_S if keepalive_s is None else keepalive_s, max_wait_s)
    collector = ServerlessCollector(name)
    metrics.registry.register(collector)

    @app.get("/v1/serverless", include_in_schema=False)
    async def serverless_stats():
        collector.latest = await asyncio.to_thread(engine.serverless_stats)
        return collector.latest

    @app.get("/v1/serverless/blocks", include_in_schema=False)
    async def serverless_blocks():
        """The block invariant on every replica's engine (kvflow/cluster/replica.py `check_blocks`)."""
        return await asyncio.to_thread(engine.client.check_blocks)

    async def refresh():
        while True:
            try:
                collector.latest = await asyncio.to_thread(engine.serverless_stats)
            except Exception as e:
                logger.debug("serverless stats: %s", e)
            await asyncio.sleep(1.0)

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                          timeout_graceful_shutdown=drain_timeout + api_server.DRAIN_BACKSTOP_S))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    o = engine_config.serverless
    print(f"kvflow: serving {name} on http://{host}:{port} (serverless on Ray Serve: {o.min_replicas}..."
          f"{o.max_replicas} replicas, warm pool {o.warm_pool}, scale down after {o.scale_down_idle_s:g}s idle)",
          flush=True)
    tasks = [asyncio.create_task(api_server.cut_at_deadline(server, app.state.serving, drain_timeout)),
             asyncio.create_task(api_server.exit_when_engine_gives_up(server, engine)),
             asyncio.create_task(refresh())]
    try:
        await server.serve()
    finally:
        for t in tasks:
            t.cancel()
        await engine.shutdown()
    return 0 if server.started and engine.fatal is None else 1
