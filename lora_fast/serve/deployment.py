"""The Ray Serve deployment: HTTP and handle ingress, multiplexed routing by adapter id, ``@serve.batch``.

Request path (one replica):

1. ``__call__`` (HTTP, JSON body) or ``generate`` (Python handle, a dict) parses a :class:`GenerationRequest`.
2. If the request carries a multiplexed model id (HTTP header ``serve_multiplexed_model_id``, or
   ``handle.options(multiplexed_model_id=...)``), the ``@serve.multiplexed`` loader makes that adapter resident in
   the replica's :class:`~lora_fast.AdapterCache` (so Serve's router sends later requests for it here); a file that
   cannot be loaded fails this request with ``LoraFormatError`` before it joins a batch.
3. The request joins ``@serve.batch``. Serve (2.60) splits a batch by multiplexed model id; batching different
   adapters together is the point of per-sample adapters, so the request enters the batch queue in a copy of its
   context whose multiplexed model id is cleared (routing has already happened).
4. The batch runs in a worker thread through :class:`~lora_fast.serve.runner.BatchRunner` (one pipeline call per
   group of compatible requests, each request with its own adapter and seed).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import importlib
import os
import threading
from typing import Optional

from ray import serve
from ray.serve import metrics

from lora_fast.cache import AdapterBudgetError, AdapterCache
from lora_fast.errors import LoraFormatError

from .runner import BatchRunner, GenerationRequest

__all__ = ["LoraDiffusionServer", "build_app", "app_builder", "MAX_MULTIPLEXED_IDS"]

#: Ids Serve's multiplexing remembers per replica (for routing only: memory is the AdapterCache's budgets).
MAX_MULTIPLEXED_IDS = 256


def _load_factory(pipeline):
    """A pipeline factory: a callable, or ``"package.module:function"``."""
    if callable(pipeline):
        return pipeline
    if isinstance(pipeline, str) and ":" in pipeline:
        mod, _, attr = pipeline.partition(":")
        return getattr(importlib.import_module(mod), attr)
    raise ValueError(f"pipeline must be a callable or 'module:function', got {pipeline!r}")


class _Failed:
    """A per-request failure carried through @serve.batch (which would otherwise fail the whole batch)."""

    def __init__(self, exc: BaseException):
        self.exc = exc


def _context_without_model_id() -> contextvars.Context:
    ctx = contextvars.copy_context()

    def clear():
        from ray.serve import context as serve_context

        rc = serve_context._get_serve_request_context()
        serve_context._serve_request_context.set(dataclasses.replace(rc, multiplexed_model_id=""))

    try:
        ctx.run(clear)
    except Exception:  # Serve's private context changed: a fresh context has no model id either
        ctx = contextvars.Context()
    return ctx


class LoraDiffusionServer:
    """One replica: a diffusers pipeline, an :class:`~lora_fast.AdapterCache` and a batch runner.

    ``pipeline``: a factory returning the pipeline (a callable, or ``"module:function"``; runs in the replica).
    ``adapters``: the cache's source (a directory, a mapping id -> path, or a callable).
    ``mode``: ``"per_sample"`` (default) or ``"fuse"`` (see :mod:`lora_fast.serve.runner`).
    ``device_budget_bytes`` / ``host_budget_bytes``: the cache's tiers.
    ``max_batch_size`` / ``batch_wait_timeout_s``: ``@serve.batch`` settings.
    ``defaults``: request fields used when a request leaves them out (e.g. ``{"steps": 4, "size": 64}``).
    ``torch_threads``: ``torch.set_num_threads`` in the replica (CPU serving), None leaves it.
    """

    def __init__(self, pipeline, adapters, *, mode: str = "per_sample", device_budget_bytes: int = 1 << 30,
                 host_budget_bytes: int = 4 << 30, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.05,
                 defaults: Optional[dict] = None, torch_threads: Optional[int] = None, components=None):
        import torch

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        self.pipe = _load_factory(pipeline)()
        self.cache = AdapterCache(self.pipe, device_budget_bytes=int(device_budget_bytes),
                                  host_budget_bytes=int(host_budget_bytes), source=adapters)
        self.runner = BatchRunner(self.pipe, self.cache, mode, components=components)
        self.defaults = dict(defaults or {})
        self._batched.set_max_batch_size(int(max_batch_size))
        self._batched.set_batch_wait_timeout_s(float(batch_wait_timeout_s))
        self._metrics_lock = threading.Lock()
        self._reported: dict = {}
        tags = ("mode",)
        self._m_batch = metrics.Histogram("lora_fast_batch_size", description="Requests per pipeline call",
                                          boundaries=[1, 2, 4, 8, 16, 32, 64], tag_keys=tags)
        self._m_counts = metrics.Counter("lora_fast_adapter_cache_events",
                                         description="AdapterCache hits, misses, evictions, loads, load failures",
                                         tag_keys=("mode", "tier", "event"))
        self._m_bytes = metrics.Gauge("lora_fast_adapter_cache_bytes", description="Adapter bytes per cache tier",
                                      tag_keys=("mode", "tier"))
        self._m_adapters = metrics.Gauge("lora_fast_adapter_cache_adapters", description="Adapters per cache tier",
                                         tag_keys=("mode", "tier"))
        self._m_failed = metrics.Counter("lora_fast_requests_failed", description="Requests that failed, by error",
                                         tag_keys=("mode", "error"))
        for m in (self._m_batch, self._m_counts, self._m_bytes, self._m_adapters, self._m_failed):
            m.set_default_tags({"mode": mode})
        self.runner.on_batch = lambda n: self._m_batch.observe(n)

    # ------------------------------------------------------------------------------------------ ingress

    async def __call__(self, request):
        """HTTP: POST a JSON request; the response is the PNG (``image/png``) or the latents (``.npy``)."""
        from starlette.responses import JSONResponse, Response

        try:
            body = await request.json()
        except Exception:
            return JSONResponse({"error": "the body must be a JSON object", "type": "ValueError"}, status_code=400)
        try:
            data = await self.generate(body)
        except AdapterBudgetError as e:
            return JSONResponse({"error": str(e), "type": type(e).__name__}, status_code=503)
        except ValueError as e:  # LoraFormatError included: a bad request or an adapter that cannot be loaded
            return JSONResponse({"error": str(e), "type": type(e).__name__}, status_code=400)
        media = "application/x-npy" if data[:6] == b"\x93NUMPY" else "image/png"
        return Response(content=data, media_type=media)

    async def generate(self, body: dict) -> bytes:
        """Python handle: ``await handle.generate.remote({...})`` (or ``.options(multiplexed_model_id=id)``)."""
        model_id = serve.get_multiplexed_model_id()
        try:
            req = GenerationRequest.from_dict(body, defaults=self.defaults, adapter_id=model_id or None)
            if model_id:
                await self.get_adapter(model_id)
        except BaseException as e:
            self._count_failure(e)
            raise
        task = asyncio.get_running_loop().create_task(self._batched(req), context=_context_without_model_id())
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if isinstance(result, _Failed):
            self._count_failure(result.exc)
            raise result.exc
        return result

    @serve.multiplexed(max_num_models_per_replica=MAX_MULTIPLEXED_IDS)
    async def get_adapter(self, adapter_id: str) -> str:
        """Serve's multiplexed loader: makes the adapter resident (not pinned) and returns its id."""

        def prefetch():
            with self.cache.lease() as lease:
                lease.add([adapter_id])

        await asyncio.to_thread(prefetch)
        self._report()
        return adapter_id

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _batched(self, requests: list) -> list:
        results = await asyncio.to_thread(self.runner.run, requests)
        self._report()
        return [_Failed(r) if isinstance(r, BaseException) else r for r in results]

    # ------------------------------------------------------------------------------------------ stats, metrics

    def stats(self) -> dict:
        """The cache's counters (:meth:`AdapterCache.stats`), the batch sizes so far, the runner's counts
        (``outcomes``: ``(requests, failed)`` per ``@serve.batch``), and
        ``replica`` / ``pid`` (this replica's id and process: a handle call reaches one replica, so several calls
        tell them apart)."""
        s = self.runner.stats
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # not inside a Serve replica (the class used directly)
            replica = None
        return {"replica": replica, "pid": os.getpid(), "cache": self.cache.stats(),
                "batch_sizes": list(s.batch_sizes), "requests": s.requests, "failed": s.failed,
                "outcomes": list(s.outcomes), "switches": s.switches, "splits": s.splits, "mode": self.runner.mode,
                "device_ids": self.cache.device_ids(), "host_ids": self.cache.host_ids()}

    def model_digest(self) -> str:
        """SHA-256 of every floating tensor of the pipeline's modules (checks exact unfusing in fuse mode)."""
        import hashlib

        import torch

        from lora_fast.targets import resolve_components

        h = hashlib.sha256()
        for name, module in sorted(resolve_components(self.pipe).items(), key=lambda kv: str(kv[0])):
            for key, t in sorted(module.state_dict().items()):
                h.update(f"{name}.{key}".encode())
                h.update(t.detach().cpu().contiguous().view(-1).view(dtype=torch.uint8).numpy())
        return h.hexdigest()

    def _count_failure(self, exc: BaseException) -> None:
        self._m_failed.inc(tags={"error": type(exc).__name__})

    def _report(self) -> None:
        s = self.cache.stats()
        now = {("device", "hit"): s["device"]["hits"], ("device", "miss"): s["device"]["misses"],
               ("device", "eviction"): s["device"]["evictions"], ("host", "hit"): s["host"]["hits"],
               ("host", "miss"): s["host"]["misses"], ("host", "eviction"): s["host"]["evictions"],
               ("disk", "load"): s["loads"], ("disk", "load_failure"): s["load_failures"]}
        with self._metrics_lock:
            for (tier, event), value in now.items():
                delta = value - self._reported.get((tier, event), 0)
                if delta > 0:
                    self._m_counts.inc(delta, tags={"tier": tier, "event": event})
                self._reported[(tier, event)] = value
        for tier in ("device", "host"):
            self._m_bytes.set(s[tier]["bytes"], tags={"tier": tier})
            self._m_adapters.set(s[tier]["adapters"], tags={"tier": tier})


def build_app(pipeline, adapters, *, num_replicas: int = 1, ray_actor_options: Optional[dict] = None,
              max_ongoing_requests: Optional[int] = None, **server_options):
    """A Serve application (for ``serve.run``) around :class:`LoraDiffusionServer`.

    ``server_options`` go to :class:`LoraDiffusionServer` (``mode``, budgets, ``max_batch_size``, ...);
    ``num_replicas`` / ``ray_actor_options`` (e.g. ``{"num_gpus": 1}``) / ``max_ongoing_requests`` to the
    deployment (by default 2x the batch size, so a full batch can wait while one runs)."""
    batch = int(server_options.get("max_batch_size", 8))
    dep = serve.deployment(LoraDiffusionServer).options(
        num_replicas=num_replicas, ray_actor_options=ray_actor_options or {"num_cpus": 1},
        max_ongoing_requests=max_ongoing_requests or max(2 * batch, 2))
    return dep.bind(pipeline, adapters, **server_options)


def app_builder(args: dict):
    """``serve run lora_fast.serve.deployment:app_builder pipeline=module:function adapters=/dir [mode=fuse] ...``

    Every other ``key=value`` is a :class:`LoraDiffusionServer` option (numbers are parsed)."""
    args = dict(args)
    pipeline, adapters = args.pop("pipeline"), args.pop("adapters")
    for k, v in list(args.items()):
        if isinstance(v, str):
            try:
                args[k] = int(v)
            except ValueError:
                try:
                    args[k] = float(v)
                except ValueError:
                    pass
    return build_app(pipeline, os.path.expanduser(adapters), **args)
