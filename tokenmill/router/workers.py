"""The standalone router's workers: their health, and which of them the router may use.

``WorkerPool`` holds the ``tokenmill serve`` base URLs given on the command line and a
``Router`` (``tokenmill.distributed.routing``) whose tenants are the healthy ones. A
background task (``run_health_checks``) asks each worker's ``GET /health`` every
``interval`` seconds: ``failures_to_remove`` failures in a row (an error status, a
refused connection, a time-out) take a worker out of the router (its prefix-tree marks
are dropped: a restarted worker has an empty cache), one success brings it back. A
request that cannot reach its worker marks it down at once (``mark_down``), without
waiting for the next check.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import httpx

from tokenmill.distributed.routing import Router, RouterConfig

logger = logging.getLogger("tokenmill.router")


@dataclass
class Worker:
    url: str
    healthy: bool = False
    failures: int = 0
    requests: int = 0
    errors: int = 0


@dataclass
class WorkerPool:
    urls: list[str]
    router_config: RouterConfig = field(default_factory=RouterConfig)
    interval: float = 2.0
    timeout: float = 2.0
    failures_to_remove: int = 2

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("give at least one --worker URL.")
        if len(set(self.urls)) != len(self.urls):
            raise ValueError("a --worker URL is given twice.")
        self.urls = [u.rstrip("/") for u in self.urls]
        self.workers = {u: Worker(u) for u in self.urls}
        self.router = Router(self.router_config)

    def healthy(self) -> list[str]:
        return [u for u, w in self.workers.items() if w.healthy]

    def mark_up(self, url: str) -> None:
        w = self.workers[url]
        w.failures = 0
        if not w.healthy:
            w.healthy = True
            self.router.add_tenant(url)
            logger.info("worker %s is up", url)

    def mark_down(self, url: str, why: str) -> None:
        w = self.workers[url]
        w.failures += 1
        if w.healthy and w.failures >= self.failures_to_remove:
            self._remove(w, why)

    def mark_dead(self, url: str, why: str) -> None:
        """A request could not reach ``url``: out of the router now."""
        w = self.workers[url]
        w.failures = max(w.failures, self.failures_to_remove)
        if w.healthy:
            self._remove(w, why)

    def _remove(self, w: Worker, why: str) -> None:
        w.healthy = False
        self.router.remove_tenant(w.url)
        logger.warning("worker %s removed: %s", w.url, why)

    async def check_once(self, client: httpx.AsyncClient) -> None:
        """One round of health checks, all workers at once."""
        async def check(url: str) -> None:
            try:
                r = await client.get(url + "/health", timeout=self.timeout)
            except httpx.HTTPError as e:
                self.mark_down(url, f"GET /health failed: {type(e).__name__}")
                return
            if r.status_code == 200:
                self.mark_up(url)
            else:
                self.mark_down(url, f"GET /health answered {r.status_code}")

        await asyncio.gather(*(check(u) for u in self.urls))

    async def run_health_checks(self, client: httpx.AsyncClient) -> None:
        while True:
            await self.check_once(client)
            await asyncio.sleep(self.interval)
