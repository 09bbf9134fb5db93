"""`kvflow serve --serverless`: the OpenAI-compatible server (kvflow/entrypoints/api_server.py, unchanged
routes) in front of the Ray Serve application of app.py, through ServeClient (chosen by
kvflow/engine/core_client.py `make_client` for a serverless config).

`ServerlessLLM` is AsyncLLM with ServeClient as its engine-core client (a request that waited
`scale_up_timeout_s` for a replica comes back as an error message with a retry-after, which AsyncLLM turns
into QueueFullError: 503 with Retry-After). GET /v1/serverless returns the serverless metrics (metrics.py); /metrics adds them as
kvflow:serverless_* series.
"""
from __future__ import annotations

import asyncio
import logging

from kvflow.engine.async_llm import AsyncLLM

logger = logging.getLogger("kvflow")


class ServerlessLLM(AsyncLLM):
    def __init__(self, config, *args, **kwargs):
        if not config.serverless.serverless:
            raise ValueError("ServerlessLLM needs a serverless config (serverless=True)")
        super().__init__(config, *args, **kwargs)
        self.num_replicas = config.serverless.max_replicas      # batch slots: the fleet at its largest

    def serverless_stats(self) -> dict:
        return self.client.serverless_stats()

    @property
    def location(self) -> str:
        o = self.config.serverless
        return (f"serverless on Ray Serve: {o.min_replicas}...{o.max_replicas} replicas, warm pool {o.warm_pool}, "
                f"scale down after {o.scale_down_idle_s:g}s idle")

    def attach(self, app, metrics) -> list:
        """GET /v1/serverless (the serverless metrics, metrics.py) and /v1/serverless/blocks (the block
        invariant on every replica); the kvflow:serverless_* series on /metrics, refreshed every second."""
        from kvflow.serverless.metrics import ServerlessCollector
        collector = ServerlessCollector(metrics.model_name)
        metrics.registry.register(collector)

        @app.get("/v1/serverless", include_in_schema=False)
        async def serverless_stats():
            collector.latest = await asyncio.to_thread(self.serverless_stats)
            return collector.latest

        @app.get("/v1/serverless/blocks", include_in_schema=False)
        async def serverless_blocks():
            return await asyncio.to_thread(self.client.check_blocks)

        async def refresh():
            while True:
                try:
                    collector.latest = await asyncio.to_thread(self.serverless_stats)
                except Exception as e:
                    logger.debug("serverless stats: %s", e)
                await asyncio.sleep(1.0)
        return [refresh()]
