"""AdapterCache: tiers, LRU eviction by bytes, leases, one load per id under concurrency, failures change nothing."""

import asyncio
import os
import threading
import time

import pytest
import torch

import lora_fast
from lora_fast import LoraFormatError
from lora_fast.cache import AdapterBudgetError, adapter_nbytes

from test_live import random_adapter, toy

MODULES = ("q", "k")


def toy_args(batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 5, 24, generator=g), torch.randn(batch, 6, 9, 9, generator=g),
            torch.randint(0, 11, (batch, 3), generator=g))


@pytest.fixture
def lora_dir(tmp_path):
    """Five adapter files a..e of one size on the toy model's q and k, plus broken ones."""
    for i, name in enumerate("abcde"):
        random_adapter(30 + i, rank=4, modules=MODULES, scale=0.1).save(str(tmp_path / f"{name}.safetensors"))
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    # reads fine, but its q factors do not fit the model's q (wrong model): the bind fails
    bad = random_adapter(40, rank=4, modules=MODULES, scale=0.1)
    bad.layers["q"].down = torch.randn(4, 23)
    bad.save(str(tmp_path / "wrong_model.safetensors"))
    return tmp_path


@pytest.fixture
def unit():
    """Bytes of one adapter of the fixture."""
    return adapter_nbytes(random_adapter(30, rank=4, modules=MODULES))


def snapshot(model, cache):
    return ({k: v.clone() for k, v in model.state_dict().items()}, lora_fast.get_list_adapters(model),
            cache.device_ids(), cache.host_ids(), cache.stats()["device"]["bytes"], cache.stats()["host"]["bytes"])


def assert_same(before, after):
    sd0, lists0, dev0, host0, db0, hb0 = before
    sd1, lists1, dev1, host1, db1, hb1 = after
    assert sd0.keys() == sd1.keys() and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    assert (lists0, dev0, host0, db0, hb0) == (lists1, dev1, host1, db1, hb1)


def test_hits_misses_evictions_and_bytes_by_tier_in_lru_order(lora_dir, unit):
    m = toy()
    cache = lora_fast.AdapterCache(m, device_budget_bytes=2 * unit, host_budget_bytes=3 * unit, source=str(lora_dir))
    for ids in (["a"], ["b"], ["a"]):
        with cache.use(ids) as names:
            assert names == ids and lora_fast.get_active_adapters(m) != []
    s = cache.stats()
    assert (s["device"]["hits"], s["device"]["misses"], s["host"]["misses"], s["loads"]) == (1, 2, 2, 2)
    assert cache.device_ids() == ["b", "a"] and s["device"]["bytes"] == 2 * unit
    with cache.use(["c"]):  # b is the least recently used: evicted from the device, kept on the host
        assert cache.device_ids() == ["a", "c"]
    assert sorted(lora_fast.get_list_adapters(m)[None]) == ["a", "c"]
    assert cache.tier("b") == "host" and cache.host_ids() == ["b", "a", "c"]  # a use touches both tiers
    with cache.use(["b"]):  # device miss, host hit: no disk read; evicts a
        pass
    s = cache.stats()
    assert (s["device"]["misses"], s["host"]["hits"], s["loads"], s["device"]["evictions"]) == (4, 1, 3, 2)
    assert cache.device_ids() == ["c", "b"] and cache.tier("a") == "host"
    with cache.use(["d"]):  # host budget 3: the host's LRU (a) goes
        pass
    s = cache.stats()
    assert cache.host_ids() == ["c", "b", "d"] and s["host"]["evictions"] == 1 and s["host"]["bytes"] == 3 * unit
    assert s["device"]["adapters"] == 2 and s["device"]["pinned"] == 0 and s["load_failures"] == 0
    assert cache.tier("a") is None and cache.tier("zz") is None


def test_host_tier_off_reads_again_from_disk(lora_dir, unit):
    m = toy()
    cache = lora_fast.AdapterCache(m, device_budget_bytes=unit, host_budget_bytes=0, source=str(lora_dir))
    for ids in (["a"], ["b"], ["a"]):
        with cache.use(ids):
            pass
    s = cache.stats()
    assert s["loads"] == 3 and s["host"]["misses"] == 3 and s["host"]["bytes"] == 0 and cache.host_ids() == []


def test_outputs_of_cached_adapters_equal_a_direct_load(lora_dir, unit):
    args = toy_args()
    direct = toy()
    for n in "abc":
        lora_fast.load_lora_weights(direct, str(lora_dir / f"{n}.safetensors"), adapter_name=n)
    entries = ["a", {"b": 0.5, "c": -1.0}, None, "c"]
    with torch.no_grad(), lora_fast.per_sample_adapters(direct, entries):
        want = direct(*args)
    m = toy()
    cache = lora_fast.AdapterCache(m, device_budget_bytes=3 * unit, host_budget_bytes=5 * unit, source=str(lora_dir))
    with torch.no_grad():
        for _ in range(2):  # disk, then after a full eviction from the host tier
            with cache.use(["a", "b", "c"]), lora_fast.per_sample_adapters(m, entries):
                got = m(*args)
            for x, y in zip(got, want):
                assert torch.equal(x, y)
            with cache.use(["d", "e"]):  # evicts two of a, b, c from the device
                pass
    assert cache.stats()["host"]["hits"] >= 2


def test_sources_mapping_and_callable(lora_dir, unit):
    m = toy()
    files = {"x": str(lora_dir / "a.safetensors"), "y": random_adapter(50, modules=MODULES)}
    cache = lora_fast.AdapterCache(m, device_budget_bytes=10 * unit, host_budget_bytes=0, source=files)
    with cache.use(["x", "y"]) as names:
        assert names == ["x", "y"]
    with pytest.raises(LoraFormatError, match="not in the cache's source"):
        with cache.use("nope"):
            pass
    calls = []
    cache2 = lora_fast.AdapterCache(toy(), device_budget_bytes=10 * unit, host_budget_bytes=0,
                                    source=lambda i: calls.append(i) or files[i], name_prefix="lora:")
    with cache2.use(["x"]) as names:
        assert names == ["lora:x"] and lora_fast.get_list_adapters(cache2.target)[None] == ["lora:x"]
    with pytest.raises(LoraFormatError, match="KeyError"):
        with cache2.use(["q"]):
            pass
    assert calls == ["x", "q"]


@pytest.mark.parametrize("bad", ["missing", "corrupt", "wrong_model", "../a"])
def test_a_failed_load_leaves_cache_and_model_as_they_were(lora_dir, unit, bad):
    m = toy()
    cache = lora_fast.AdapterCache(m, device_budget_bytes=2 * unit, host_budget_bytes=2 * unit, source=str(lora_dir))
    for ids in (["a"], ["b"]):
        with cache.use(ids):
            pass
    args = toy_args()
    with torch.no_grad(), lora_fast.per_sample_adapters(m, ["a", "b"]):
        out0 = m(*args)
    before = snapshot(m, cache)
    with pytest.raises(LoraFormatError):  # the device is full: the bind would evict a, and must not have
        with cache.use([bad]):
            pass
    assert_same(before, snapshot(m, cache))
    assert cache.stats()["load_failures"] == (0 if bad == "wrong_model" else 1)
    with torch.no_grad(), lora_fast.per_sample_adapters(m, ["a", "b"]):
        out1 = m(*args)
    for x, y in zip(out0, out1):
        assert torch.equal(x, y)
    # all or nothing: a call with a good new id and a bad one binds neither
    with pytest.raises(LoraFormatError):
        with cache.use(["c", bad]):
            pass
    assert lora_fast.get_list_adapters(m)[None] == ["a", "b"] or sorted(lora_fast.get_list_adapters(m)[None]) == ["a", "b"]
    assert "c" not in cache.device_ids()


def test_in_use_adapters_are_never_evicted(lora_dir, unit):
    m = toy()
    cache = lora_fast.AdapterCache(m, device_budget_bytes=2 * unit, host_budget_bytes=0, source=str(lora_dir),
                                   wait_timeout=0.2)
    big = lora_fast.AdapterCache(toy(), device_budget_bytes=unit - 1, host_budget_bytes=0, source=str(lora_dir))
    with pytest.raises(AdapterBudgetError, match="more than device_budget_bytes"):
        with big.use("a"):
            pass
    lease = cache.lease()
    lease.add(["a", "b"])
    with pytest.raises(AdapterBudgetError, match="split the batch"):  # its own pins: at once, and it keeps them
        lease.add("c")
    assert lease.ids == ["a", "b"] and cache.device_ids() == ["a", "b"]
    with pytest.raises(AdapterBudgetError, match="no room"):  # another, empty lease waits, then gives up
        with cache.use("c"):
            pass
    assert cache.device_ids() == ["a", "b"] and cache.stats()["device"]["pinned"] == 2
    done = {}

    def later():
        with cache.use("c") as names:
            done["names"] = names

    cache.wait_timeout = 60.0
    t = threading.Thread(target=later)
    t.start()
    time.sleep(0.3)
    assert t.is_alive() and "c" not in cache.device_ids()  # waiting for the lease
    lease.close()
    t.join(30)
    assert done["names"] == ["c"] and cache.device_ids() == ["b", "c"]


def test_no_bind_or_delete_while_a_lease_runs(lora_dir, unit):
    m = toy()
    cache = lora_fast.AdapterCache(m, device_budget_bytes=unit, host_budget_bytes=0, source=str(lora_dir))
    other = {}
    with cache.use("a"):
        with cache.use("a"):  # already resident: fine inside a running section
            pass
        with pytest.raises(RuntimeError, match="running section"):  # a load there would wait for itself
            with cache.use("b"):
                pass
        t = threading.Thread(target=lambda: other.update(ok=cache.use("b").__enter__()))
        t.start()
        time.sleep(0.3)
        assert lora_fast.get_list_adapters(m)[None] == ["a"]  # b waits for this section to end
    t.join(30)
    assert other["ok"] == ["b"] and lora_fast.get_list_adapters(m)[None] == ["b"]


def counting_source(lora_dir, delay=0.3):
    calls = []
    lock = threading.Lock()

    def source(i):
        with lock:
            calls.append(i)
        time.sleep(delay)  # keep the read in flight while the others arrive
        return str(lora_dir / f"{i}.safetensors")

    return source, calls


def test_concurrent_requests_for_one_missing_id_load_it_once_threads(lora_dir, unit):
    m = toy()
    source, calls = counting_source(lora_dir)
    cache = lora_fast.AdapterCache(m, device_budget_bytes=4 * unit, host_budget_bytes=4 * unit, source=source)
    barrier = threading.Barrier(6)
    results, errors = [], []

    def worker(i):
        barrier.wait()
        try:
            with cache.use(["a", "b"] if i % 2 else ["b", "a"]) as names:
                results.append(sorted(names))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and results == [["a", "b"]] * 6
    assert sorted(calls) == ["a", "b"]
    s = cache.stats()
    assert s["loads"] == 2 and s["device"]["hits"] + s["device"]["misses"] == 12 and s["device"]["pinned"] == 0
    assert sorted(lora_fast.get_list_adapters(m)[None]) == ["a", "b"]


def test_concurrent_requests_for_one_missing_id_load_it_once_asyncio(lora_dir, unit):
    m = toy()
    source, calls = counting_source(lora_dir)
    cache = lora_fast.AdapterCache(m, device_budget_bytes=4 * unit, host_budget_bytes=4 * unit, source=source)

    async def one(ids):
        async with cache.use_async(ids) as names:
            await asyncio.sleep(0.01)
            return names

    async def main():
        return await asyncio.gather(*(one(["c"]) for _ in range(5)), one(["c", "d"]),
                                    one(["missing"]), return_exceptions=True)

    out = asyncio.run(main())
    assert out[:6] == [["c"]] * 5 + [["c", "d"]]
    assert isinstance(out[6], LoraFormatError)
    assert sorted(calls) == ["c", "d", "missing"] and cache.stats()["loads"] == 2
    assert cache.stats()["device"]["pinned"] == 0 and cache._running == 0


def test_a_failed_read_is_shared_by_the_requests_waiting_for_it(tmp_path, unit):
    source, calls = counting_source(tmp_path, delay=0.3)  # no files: every read fails
    cache = lora_fast.AdapterCache(toy(), device_budget_bytes=unit, host_budget_bytes=unit, source=source)
    errors = []

    def worker():
        try:
            with cache.use("a"):
                pass
        except LoraFormatError as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(errors) == 4 and len(calls) < 4 and cache.stats()["load_failures"] == len(calls)
    assert cache.device_ids() == [] and cache.host_ids() == []


def test_discard_and_bad_arguments(lora_dir, unit):
    m = toy()
    cache = lora_fast.AdapterCache(m, device_budget_bytes=2 * unit, host_budget_bytes=2 * unit, source=str(lora_dir))
    with cache.use("a"):
        with pytest.raises(RuntimeError, match="in use"):
            cache.discard("a")
    assert cache.discard("a") and cache.tier("a") is None and lora_fast.get_list_adapters(m) == {}
    assert not cache.discard("a")
    with pytest.raises(ValueError):
        lora_fast.AdapterCache(m, device_budget_bytes=-1, host_budget_bytes=0, source=str(lora_dir))
    with pytest.raises(ValueError):
        lora_fast.AdapterCache(m, device_budget_bytes=1, host_budget_bytes=0, source=3)
    with pytest.raises(LoraFormatError):
        with cache.use([3]):
            pass


def test_import_lora_fast_does_not_import_ray():
    import subprocess
    import sys

    code = "import sys, lora_fast; assert 'ray' not in sys.modules and 'lora_fast.serve' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


@pytest.mark.cuda
def test_host_tier_is_pinned_and_rebinds_to_the_gpu(lora_dir, unit):
    m = toy().cuda()
    cache = lora_fast.AdapterCache(m, device_budget_bytes=unit, host_budget_bytes=2 * unit, source=str(lora_dir))
    args = [a.cuda() for a in toy_args()]
    outs = []
    for ids in (["a"], ["b"], ["a"]):
        with torch.no_grad(), cache.use(ids), lora_fast.per_sample_adapters(m, ids):
            outs.append(m(*args))
    host = cache._host["a"].adapter
    assert all(l.down.is_pinned() and l.up.is_pinned() for l in host.layers.values())
    assert cache.stats()["host"]["hits"] == 1 and cache.stats()["loads"] == 2
    for x, y in zip(outs[0], outs[2]):
        assert torch.equal(x, y)
