"""AdapterCache: many LoRA adapters served from one model, in two tiers bounded by bytes.

An adapter is asked for by id. The cache resolves the id through its ``source`` (a directory, a mapping
``id -> path`` or a callable), reads the file with :func:`lora_fast.read_lora` and binds it into the target with
:func:`lora_fast.load_lora_weights` as a live (unfused) adapter named by the id. Two tiers:

* **device**: adapters bound into the target (their factors on the weights' device);
* **host**: the read :class:`~lora_fast.LoraAdapter` objects kept in host memory (copied into pinned memory when
  the weights are on a GPU), so binding an adapter again after a device eviction skips the disk. The host tier is
  inclusive: an adapter may be in both tiers at once.

Each tier holds at most its budget of bytes (the adapter's tensors' bytes in that tier), evicting the least
recently used adapters first. An adapter held by a :class:`Lease` (``cache.use(ids)``, ``cache.lease()``) is never
evicted from the device tier. See docs/serving.md for the whole picture (waiting, failures, counters).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import threading
import time
from concurrent.futures import Future
from typing import Callable, Iterable, Mapping, Optional, Union

import torch

from .adapter import LoraAdapter, LoraLayer
from .errors import LoraError, LoraFormatError

__all__ = ["AdapterCache", "AdapterBudgetError", "Lease"]

_EXTENSIONS = (".safetensors",)


class AdapterBudgetError(LoraError, RuntimeError):
    """The adapters asked for cannot be on the device together within ``device_budget_bytes``.

    Raised at once when one adapter alone is larger than the budget, or when it does not fit next to the adapters
    the same lease already holds (the caller splits its batch); after ``wait_timeout`` seconds when other leases
    hold the room it needs."""


def adapter_nbytes(adapter: LoraAdapter) -> int:
    """Bytes of every tensor of an adapter (factors, Tucker cores, DoRA magnitudes, biases)."""
    total = 0
    for layer in adapter.layers.values():
        for t in (layer.down, layer.up, layer.magnitude, layer.bias, layer.mid):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def _pinned_copy(adapter: LoraAdapter) -> LoraAdapter:
    """The same adapter with every tensor in pinned host memory (for fast copies to a GPU)."""

    def pin(t):
        return None if t is None else t.cpu().pin_memory()

    layers = {
        key: LoraLayer(down=pin(l.down), up=pin(l.up), alpha=l.alpha, kind=l.kind, use_rslora=l.use_rslora,
                       magnitude=pin(l.magnitude), magnitude_axis=l.magnitude_axis, fan_in_fan_out=l.fan_in_fan_out,
                       bias=pin(l.bias), mid=pin(l.mid))
        for key, l in adapter.layers.items()
    }
    return LoraAdapter(layers, adapter.format, dict(adapter.metadata), adapter.source, adapter.family)


def _target_device(target) -> torch.device:
    from .targets import resolve_components

    for module in resolve_components(target).values():
        for p in module.parameters():
            return p.device
    return torch.device("cpu")


class _Entry:
    __slots__ = ("adapter", "nbytes", "pins")

    def __init__(self, adapter: Optional[LoraAdapter], nbytes: int):
        self.adapter = adapter
        self.nbytes = nbytes
        self.pins = 0


class Lease:
    """Adapters pinned on the device for a caller (see :meth:`AdapterCache.lease`).

    ``add(ids)`` makes adapters resident and pins them; ``with lease.running():`` marks the section in which the
    target runs (no adapter is bound into or deleted from the target while any lease is running); ``close()``
    unpins everything. A lease is also a context manager that closes it. Not meant to be shared between threads.
    """

    def __init__(self, cache: "AdapterCache"):
        self._cache = cache
        self._ids: list[str] = []
        self._closed = False

    @property
    def ids(self) -> list[str]:
        """The ids pinned by this lease, in the order they were first added."""
        return list(self._ids)

    @property
    def nbytes(self) -> int:
        """Device bytes of the adapters this lease pins."""
        return self._cache._bytes_of(self._ids)

    def add(self, ids: Union[str, Iterable[str]]) -> list[str]:
        """Make these adapters resident on the device and pin them; returns their adapter names in the target.

        All or nothing: if one id fails (``LoraFormatError`` for a file that cannot be loaded, AdapterBudgetError
        when it does not fit), the adapters this call bound are deleted again and the lease keeps what it had."""
        if self._closed:
            raise RuntimeError("this lease is closed")
        ids = [ids] if isinstance(ids, str) else list(ids)
        return self._cache._add(self, ids)

    async def add_async(self, ids: Union[str, Iterable[str]]) -> list[str]:
        """:meth:`add` in a worker thread (the event loop keeps running while files are read)."""
        return await asyncio.to_thread(self.add, ids)

    @contextlib.contextmanager
    def running(self):
        """The section in which the target runs with this lease's adapters (e.g. one pipeline call)."""
        self._cache._enter_running()
        try:
            yield self.names()
        finally:
            self._cache._leave_running()

    def names(self) -> list[str]:
        return [self._cache.name_of(i) for i in self._ids]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._cache._release(self._ids)
            self._ids = []

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # a lease dropped without close() must not pin its adapters forever
        try:
            self.close()
        except Exception:
            pass


class AdapterCache:
    """LoRA adapters by id, loaded on demand into ``target`` as named live adapters; two tiers bounded by bytes.

    ``target``: what every lora_fast call takes (a diffusers pipeline, an ``nn.Module`` or ``{component: module}``).
    ``device_budget_bytes``: the most bytes of adapter tensors bound into the target at once.
    ``host_budget_bytes``: the most bytes of read adapters kept in host memory (0 turns the host tier off).
    ``source``: where ids come from: a directory (``<dir>/<id>.safetensors``, or ``<dir>/<id>`` when that file or
    directory exists), a mapping ``id -> path`` (or ``id -> LoraAdapter``), or a callable ``source(id)`` returning a
    path, a state dict or a :class:`~lora_fast.LoraAdapter`.
    ``name_prefix``: adapter names in the target are ``name_prefix + id`` (default: the id itself).
    ``wait_timeout``: seconds a lease holding nothing waits for other leases to free device room before
    :class:`AdapterBudgetError` (see :meth:`lease`).
    ``device``: where the weights are (default: the device of the target's first parameter); on a CUDA device the
    host tier keeps pinned copies.

    Use::

        cache = lora_fast.AdapterCache(pipe, device_budget_bytes=2 << 30, host_budget_bytes=8 << 30,
                                       source="/models/loras")
        with cache.use(["ink", "pixel"]) as names:          # loaded (or found), pinned while the block runs
            with lora_fast.per_sample_adapters(pipe, names):
                images = pipe(["a cat", "a dog"], generator=[...]).images

    Thread-safe: concurrent requests for one missing id read and bind it once (the others wait for that load);
    asyncio code uses :meth:`use_async` / :meth:`Lease.add_async`, which do the blocking work in worker threads.
    A load that fails (the id cannot be resolved, the file is missing or corrupt, or it does not fit the target's
    modules) raises :class:`~lora_fast.LoraFormatError` and leaves the cache and the target as they were.
    As :func:`lora_fast.load_lora_weights` does, binding an adapter makes it the target's active adapter; serving
    code selects adapters per call (``per_sample_adapters``, or ``fuse_lora`` with ``adapter_names``).
    """

    def __init__(self, target, *, device_budget_bytes: int, host_budget_bytes: int, source,
                 name_prefix: str = "", wait_timeout: float = 60.0, device=None):
        for what, v in (("device_budget_bytes", device_budget_bytes), ("host_budget_bytes", host_budget_bytes)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"AdapterCache: {what} must be a non-negative int, got {v!r}")
        if not (isinstance(source, (str, os.PathLike, Mapping)) or callable(source)):
            raise ValueError("AdapterCache: source must be a directory, a mapping id -> path, or a callable")
        self.target = target
        self.device_budget_bytes = device_budget_bytes
        self.host_budget_bytes = host_budget_bytes
        self.source = source
        self.name_prefix = name_prefix
        self.wait_timeout = float(wait_timeout)
        self.device = torch.device(device) if device is not None else _target_device(target)
        self._pin_host = self.device.type == "cuda"
        self._cv = threading.Condition(threading.RLock())
        self._device: "collections.OrderedDict[str, _Entry]" = collections.OrderedDict()  # LRU first
        self._host: "collections.OrderedDict[str, _Entry]" = collections.OrderedDict()
        self._reads: dict[str, Future] = {}  # id -> in-flight read (one per id)
        self._running = 0  # leases inside running()
        self._mutating = False  # a thread is binding into / deleting from the target
        self._writers_waiting = 0
        self._local = threading.local()
        self._counters = collections.Counter()

    # ------------------------------------------------------------------------------------------ public

    def name_of(self, adapter_id: str) -> str:
        """The adapter name an id has in the target."""
        return f"{self.name_prefix}{adapter_id}"

    def lease(self) -> Lease:
        """A new, empty :class:`Lease`.

        Waiting and errors when the device budget is short (after evicting every unpinned adapter):

        * an adapter larger than the whole budget: :class:`AdapterBudgetError` at once;
        * an adapter that does not fit next to what this lease already pins: :class:`AdapterBudgetError` at once,
          so the caller can run what it has and start another lease for the rest (a serving batch is split);
        * an empty lease blocked by other leases' pins: waits up to ``wait_timeout`` seconds for them to close,
          then :class:`AdapterBudgetError`. A lease holding pins never waits for other leases' pins, so two
          leases cannot wait on each other.
        """
        return Lease(self)

    @contextlib.contextmanager
    def use(self, ids: Union[str, Iterable[str]]):
        """``with cache.use(ids) as names:`` loads (or finds) the adapters, pins them and yields their names in the
        target; the block is a running section (see :meth:`Lease.running`)."""
        with self.lease() as lease:
            lease.add(ids)
            with lease.running() as names:
                yield names

    @contextlib.asynccontextmanager
    async def use_async(self, ids: Union[str, Iterable[str]]):
        """:meth:`use` for asyncio code: loading and waiting happen in worker threads, never on the event loop.
        A task cancelled while it waits gives back what the worker thread pinned once that thread finishes."""
        lease = self.lease()
        try:
            await _unwind_on_cancel(asyncio.to_thread(lease.add, ids), lease.close)
        except asyncio.CancelledError:
            raise  # the lease is closed when the worker thread is done
        except BaseException:
            lease.close()
            raise

        def leave_and_close():
            self._leave_running_anywhere()
            lease.close()

        try:
            await _unwind_on_cancel(asyncio.to_thread(self._enter_running_anywhere), leave_and_close)
        except asyncio.CancelledError:
            raise
        except BaseException:
            lease.close()
            raise
        try:
            yield lease.names()
        finally:
            self._leave_running_anywhere()
            lease.close()

    def tier(self, adapter_id: str) -> Optional[str]:
        """``"device"``, ``"host"`` or None: where an adapter is now (device wins when it is in both)."""
        with self._cv:
            if adapter_id in self._device:
                return "device"
            return "host" if adapter_id in self._host else None

    def device_ids(self) -> list[str]:
        """Ids bound into the target, least recently used first."""
        with self._cv:
            return list(self._device)

    def host_ids(self) -> list[str]:
        """Ids held in host memory, least recently used first."""
        with self._cv:
            return list(self._host)

    def stats(self) -> dict:
        """Counters and sizes::

            {"device": {"hits", "misses", "evictions", "bytes", "adapters", "budget_bytes", "pinned"},
             "host": {"hits", "misses", "evictions", "bytes", "adapters", "budget_bytes"},
             "loads", "load_failures", "coalesced", "load_seconds", "bind_seconds"}

        A request for an id counts one device hit or miss; a device miss consults the host tier (host hit or
        miss), except when it joins a load already in flight for that id (``coalesced``). ``loads`` counts file
        reads that succeeded, ``load_failures`` the ones that raised; ``load_seconds``/``bind_seconds`` are the
        total time spent reading files and binding adapters."""
        with self._cv:
            c = self._counters
            return {
                "device": {"hits": c["device_hits"], "misses": c["device_misses"],
                           "evictions": c["device_evictions"], "bytes": self._tier_bytes(self._device),
                           "adapters": len(self._device), "budget_bytes": self.device_budget_bytes,
                           "pinned": sum(1 for e in self._device.values() if e.pins)},
                "host": {"hits": c["host_hits"], "misses": c["host_misses"], "evictions": c["host_evictions"],
                         "bytes": self._tier_bytes(self._host), "adapters": len(self._host),
                         "budget_bytes": self.host_budget_bytes},
                "loads": c["loads"], "load_failures": c["load_failures"], "coalesced": c["coalesced"],
                "load_seconds": c["load_seconds"], "bind_seconds": c["bind_seconds"],
            }

    def discard(self, adapter_id: str) -> bool:
        """Drop an adapter from both tiers (e.g. its file changed). Refused (RuntimeError) while a lease pins it.
        Returns whether it was cached."""
        with self._cv:
            entry = self._device.get(adapter_id)
            if entry is not None and entry.pins:
                raise RuntimeError(f"adapter {adapter_id!r} is in use by a lease")
            found = self._host.pop(adapter_id, None) is not None
            if entry is None:
                return found
            self._become_writer()
            del self._device[adapter_id]
        try:
            from . import delete_adapters

            delete_adapters(self.target, [self.name_of(adapter_id)])
        finally:
            self._end_writer()
        return True

    # ------------------------------------------------------------------------------------------ internals

    @staticmethod
    def _tier_bytes(tier) -> int:
        return sum(e.nbytes for e in tier.values())

    def _bytes_of(self, ids) -> int:
        with self._cv:
            return sum(self._device[i].nbytes for i in set(ids) if i in self._device)

    def _enter_running(self) -> None:
        with self._cv:
            while self._mutating or self._writers_waiting:
                self._cv.wait()
            self._running += 1
            self._local.running = getattr(self._local, "running", 0) + 1

    def _leave_running(self) -> None:
        with self._cv:
            self._running -= 1
            self._local.running = max(0, getattr(self._local, "running", 0) - 1)
            self._cv.notify_all()

    def _enter_running_anywhere(self) -> None:
        """A running section not tied to the calling thread (asyncio: entered in a worker, left on the loop)."""
        with self._cv:
            while self._mutating or self._writers_waiting:
                self._cv.wait()
            self._running += 1

    def _leave_running_anywhere(self) -> None:
        with self._cv:
            self._running -= 1
            self._cv.notify_all()

    def _become_writer(self) -> None:
        """Wait (holding the lock) until nothing runs and nobody else binds, then mark the target as changing."""
        if getattr(self._local, "running", 0):
            raise RuntimeError("AdapterCache: this thread is inside a running section (lease.running() / use()); "
                               "add adapters before entering it, not inside it")
        self._writers_waiting += 1
        try:
            while self._mutating or self._running:
                self._cv.wait()
        finally:
            self._writers_waiting -= 1
        self._mutating = True

    def _end_writer(self) -> None:
        with self._cv:
            self._mutating = False
            self._cv.notify_all()

    def _release(self, ids) -> None:
        with self._cv:
            for i in ids:
                entry = self._device.get(i)
                if entry is not None:
                    entry.pins -= 1
                    self._device.move_to_end(i)
            self._cv.notify_all()

    def _resolve(self, adapter_id: str):
        src = self.source
        if callable(src) and not isinstance(src, Mapping):
            return src(adapter_id)
        if isinstance(src, Mapping):
            if adapter_id not in src:
                raise LoraFormatError(f"adapter id {adapter_id!r}: not in the cache's source mapping")
            return src[adapter_id]
        if not adapter_id or adapter_id in (".", "..") or "/" in adapter_id or os.sep in adapter_id or "\0" in adapter_id:
            raise LoraFormatError(f"adapter id {adapter_id!r}: not a file name in the source directory")
        base = os.path.join(os.fspath(src), adapter_id)
        if os.path.exists(base):
            return base
        for ext in _EXTENSIONS:
            if os.path.exists(base + ext):
                return base + ext
        raise LoraFormatError(f"adapter id {adapter_id!r}: {base}.safetensors: no such file")

    def _read(self, adapter_id: str) -> LoraAdapter:
        """Resolve and read one id (no lock held); every failure becomes LoraFormatError."""
        from .formats import read_lora

        try:
            src = self._resolve(adapter_id)
            adapter = src if isinstance(src, LoraAdapter) else read_lora(src)
            if not adapter.layers:
                raise LoraFormatError(f"adapter id {adapter_id!r}: {adapter.source or 'adapter'} holds no LoRA layers")
            if self._pin_host:
                adapter = _pinned_copy(adapter)
            return adapter
        except LoraFormatError:
            raise
        except Exception as e:  # missing file, unreadable directory, a source callable that failed
            raise LoraFormatError(f"adapter id {adapter_id!r}: cannot be loaded: {type(e).__name__}: {e}") from e

    def _fetch(self, missing: list[str]) -> tuple[dict[str, LoraAdapter], list[str]]:
        """The read adapters for ids that are not on the device: host hits, loads in flight, new reads.

        Returns ({id: adapter}, ids this call leads). First every id is classified under the lock (host hit,
        leader of a new read, or follower of a load in flight); then the leader reads run; only then are the
        followers' loads awaited, so two calls that lead and follow each other's ids never wait on each other.
        A leader keeps its ``_reads`` entry until its bind is done (:meth:`_add` removes it), so a request that
        arrives between the read and the bind joins the load instead of reading the file again."""
        out: dict[str, LoraAdapter] = {}
        lead: dict[str, Future] = {}
        follow: dict[str, Future] = {}
        with self._cv:
            for i in missing:
                entry = self._host.get(i)
                if entry is not None:
                    self._counters["host_hits"] += 1
                    self._host.move_to_end(i)
                    out[i] = entry.adapter
                elif i in self._reads:
                    self._counters["coalesced"] += 1
                    follow[i] = self._reads[i]
                else:
                    self._counters["host_misses"] += 1
                    lead[i] = self._reads[i] = Future()
        failure = None
        for i, fut in lead.items():
            t0 = time.perf_counter()
            try:
                adapter = self._read(i)
            except BaseException as e:
                with self._cv:
                    self._counters["load_failures"] += 1
                    del self._reads[i]
                fut.set_exception(e)
                failure = failure or e
                continue
            with self._cv:
                self._counters["loads"] += 1
                self._counters["load_seconds"] += time.perf_counter() - t0
            fut.set_result(adapter)
            out[i] = adapter
        leaders = [i for i in lead if i in out]
        try:
            if failure is not None:
                raise failure
            for i, fut in follow.items():
                out[i] = fut.result()  # raises the leader's LoraFormatError
        except BaseException:
            self._drop_reads(leaders)
            raise
        return out, leaders

    def _drop_reads(self, ids) -> None:
        with self._cv:
            for i in ids:
                self._reads.pop(i, None)

    def _keep_on_host(self, adapter_id: str, adapter: LoraAdapter, nbytes: int) -> None:
        """Insert a successfully bound adapter into the host tier (lock held), evicting LRU entries."""
        if adapter_id in self._host:
            self._host.move_to_end(adapter_id)
            return
        if nbytes > self.host_budget_bytes:
            return
        while self._tier_bytes(self._host) + nbytes > self.host_budget_bytes:
            self._host.popitem(last=False)
            self._counters["host_evictions"] += 1
        self._host[adapter_id] = _Entry(adapter, nbytes)

    def _pin_resident(self, lease: Lease, adapter_id: str) -> bool:
        """Lock held: if the id is on the device, pin it for the lease (a device hit)."""
        entry = self._device.get(adapter_id)
        if entry is None:
            return False
        if adapter_id not in lease._ids:
            entry.pins += 1
            lease._ids.append(adapter_id)
        self._device.move_to_end(adapter_id)
        if adapter_id in self._host:
            self._host.move_to_end(adapter_id)
        return True

    def _room(self, lease: Lease, nbytes: dict) -> bool:
        """Lock held: whether the adapters ``nbytes`` ({id: bytes}) fit after evicting every unpinned adapter;
        raises when they never will for this lease (see :meth:`lease`)."""
        need = sum(nbytes.values())
        for i, n in nbytes.items():
            if n > self.device_budget_bytes:
                raise AdapterBudgetError(f"adapter {i!r} needs {n} bytes on the device, more than "
                                         f"device_budget_bytes={self.device_budget_bytes}")
        if need > self.device_budget_bytes:
            raise AdapterBudgetError(f"adapters {sorted(nbytes)} need {need} bytes on the device together, more than "
                                     f"device_budget_bytes={self.device_budget_bytes}: split the batch")
        pinned = sum(e.nbytes for e in self._device.values() if e.pins)
        if pinned + need <= self.device_budget_bytes:
            return True
        if lease._ids:
            raise AdapterBudgetError(
                f"adapters {sorted(nbytes)} ({need} bytes) do not fit on the device next to the {pinned} bytes of "
                f"adapters in use (this lease's {len(lease._ids)} included; budget {self.device_budget_bytes}): "
                "split the batch")
        return False

    def _add(self, lease: Lease, ids: list[str]) -> list[str]:
        """All or nothing: every read happens before any bind, and the binds run in one writer section that
        evicts its victims only once every new adapter is bound."""
        for i in ids:
            if not isinstance(i, str):
                raise LoraFormatError(f"adapter ids are strings, got {i!r}")
        before = list(lease._ids)
        try:
            with self._cv:
                missing = []
                for i in dict.fromkeys(ids):
                    if self._pin_resident(lease, i):
                        self._counters["device_hits"] += 1
                    else:
                        self._counters["device_misses"] += 1
                        missing.append(i)
            if missing:
                adapters, leaders = self._fetch(missing)
                try:
                    self._bind(lease, adapters)
                finally:
                    self._drop_reads(leaders)
        except BaseException:
            added = [i for i in lease._ids if i not in before]
            lease._ids = before
            self._release(added)
            raise
        return [self.name_of(i) for i in ids]

    def _bind(self, lease: Lease, adapters: dict[str, LoraAdapter]) -> None:
        adapters = dict(adapters)
        nbytes = {i: adapter_nbytes(a) for i, a in adapters.items()}
        deadline = time.monotonic() + self.wait_timeout
        with self._cv:
            while True:
                for i in list(adapters):
                    if self._pin_resident(lease, i):  # another thread bound it meanwhile
                        del adapters[i], nbytes[i]
                if not adapters:
                    return
                if self._room(lease, nbytes) and not self._mutating and not self._running:
                    break
                if getattr(self._local, "running", 0):
                    raise RuntimeError("AdapterCache: this thread is inside a running section (lease.running() / "
                                       "use()); add adapters before entering it, not inside it")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AdapterBudgetError(
                        f"adapters {sorted(nbytes)} ({sum(nbytes.values())} bytes): no room on the device after "
                        f"{self.wait_timeout} s (budget {self.device_budget_bytes}, pinned by running leases)")
                self._writers_waiting += 1
                try:
                    self._cv.wait(timeout=left)
                finally:
                    self._writers_waiting -= 1
            self._mutating = True
            # Victims: least recently used unpinned adapters, until the new ones fit. They leave the tier now (no
            # lease can pin them) but stay bound until every new adapter is bound, so a failure puts them back.
            need = sum(nbytes.values())
            victims = []
            used = self._tier_bytes(self._device)
            for vid, e in list(self._device.items()):
                if used + need <= self.device_budget_bytes:
                    break
                if not e.pins:
                    victims.append((vid, e))
                    used -= e.nbytes
            for vid, _ in victims:
                del self._device[vid]
        try:
            from . import delete_adapters, load_lora_weights

            t0 = time.perf_counter()
            bound = []
            try:
                for i, adapter in adapters.items():
                    load_lora_weights(self.target, adapter, adapter_name=self.name_of(i))
                    bound.append(i)
            except BaseException:
                try:
                    if bound:
                        delete_adapters(self.target, [self.name_of(i) for i in bound])
                finally:
                    with self._cv:
                        restored = collections.OrderedDict(victims)
                        restored.update(self._device)
                        self._device.clear()
                        self._device.update(restored)
                raise
            bind_s = time.perf_counter() - t0
            if victims:
                delete_adapters(self.target, [self.name_of(v) for v, _ in victims])
            with self._cv:
                for i, adapter in adapters.items():
                    entry = _Entry(None, nbytes[i])
                    entry.pins = 1
                    self._device[i] = entry
                    lease._ids.append(i)
                    if self.host_budget_bytes:
                        self._keep_on_host(i, adapter, nbytes[i])
                self._counters["device_evictions"] += len(victims)
                self._counters["bind_seconds"] += bind_s
        finally:
            self._end_writer()


async def _unwind_on_cancel(awaitable, undo: Callable[[], None]):
    """Await a worker-thread call; if the awaiting task is cancelled, run ``undo`` once the thread has finished."""
    fut = asyncio.ensure_future(awaitable)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        fut.add_done_callback(lambda f: undo() if not f.cancelled() and f.exception() is None else None)
        raise
