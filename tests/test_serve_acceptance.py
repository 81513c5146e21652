"""Acceptance test of the Ray Serve deployment: 2 replicas, 10 adapters, a device tier holding 3 adapters per replica.

60 requests from 4 concurrent clients (single adapters routed by multiplexed id, ``{id: weight}`` mixes, the base
model, an unknown adapter and a corrupt file); every good image equals the same request run alone in-process; the
cache evicted and hit its host tier; the bad requests fail alone (also next to good requests in one batch) and the replicas keep serving; shutdown leaves
no Ray process behind. One local Ray instance (2 CPUs) for the whole test; about 1-2 minutes on a loaded 2-core
machine.
"""

import asyncio
import random
import time

import pytest

import lora_fast

pytest.importorskip("diffusers")
psutil = pytest.importorskip("psutil")

from lora_fast.serve.demo import tiny_pipeline, write_adapters  # noqa: E402
from lora_fast.serve.runner import GenerationRequest, decode_npy  # noqa: E402
from test_serve import alone, rel_max, start_ray  # noqa: E402  (request alone, error measure, ray.init)

NAMES = tuple(f"style{i}" for i in range(10))
STEPS, SIZE = 2, 16
TOL = 1e-5  # max |served - alone| / max |alone|, fp32
N_REQUESTS, CLIENTS = 60, 4
UNKNOWN_AT, CORRUPT_AT = 21, 42  # indices of the two bad requests in the traffic
PROMPTS = ("a red cat", "a blue dog", "a house by the sea", "an old tree")


def traffic() -> list[dict]:
    """60 request bodies: ~55% one adapter, ~25% a two-adapter mix, ~20% the base model; two bad ones."""
    rng = random.Random(1234)
    bodies = []
    for i in range(N_REQUESTS):
        u = rng.random()
        if u < 0.55:
            adapter = rng.choice(NAMES)
        elif u < 0.8:
            a, b = rng.sample(NAMES, 2)
            w = round(rng.uniform(0.2, 0.8), 2)
            adapter = {a: w, b: round(1.0 - w, 2)}
        else:
            adapter = None
        body = {"prompt": rng.choice(PROMPTS), "adapter": adapter, "seed": rng.randrange(1000), "output": "latent"}
        if rng.random() < 0.2:
            body["lora_scale"] = 0.5
        bodies.append(body)
    bodies[UNKNOWN_AT] = {"prompt": "a cow", "adapter": "no-such-style", "seed": 5, "output": "latent"}
    bodies[CORRUPT_AT] = {"prompt": "a hen", "adapter": "broken", "seed": 6, "output": "latent"}
    return bodies


async def fire_each(handle, bodies):
    """Concurrent requests, each routed by its adapter id."""
    return await asyncio.gather(*(handle.options(multiplexed_model_id=b["adapter"]).generate.remote(b)
                                  for b in bodies))


def ray_session_processes(session_name: str) -> list:
    """Live processes whose command line names this Ray session (gcs_server, raylet, agents, ...)."""
    found = []
    if not session_name:
        return found
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and session_name in " ".join(p.info["cmdline"] or ()):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def alive(procs) -> list:
    _, still = psutil.wait_procs(procs, timeout=30)
    out = []
    for p in still:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.slow
def test_two_replicas_ten_adapters_mixed_traffic_then_clean_shutdown(tmp_path):
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from lora_fast.cache import adapter_nbytes
    from lora_fast.serve import build_app

    write_adapters(tmp_path, NAMES + ("burst",))  # also broken.safetensors (not a safetensors file)
    one = adapter_nbytes(lora_fast.read_lora(str(tmp_path / f"{NAMES[0]}.safetensors")))
    bodies = traffic()

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    t0 = time.perf_counter()
    start_ray(ray)
    try:
        try:  # Ray's private API: the processes' command lines name the session (gcs_server, raylet, agents)
            session = ray._private.worker._global_node.session_name
        except AttributeError:
            session = None  # then only this process's descendants and the replicas' pids are watched
        app = build_app("lora_fast.serve.demo:tiny_pipeline", str(tmp_path), num_replicas=2,
                        ray_actor_options={"num_cpus": 0.5}, device_budget_bytes=3 * one,
                        host_budget_bytes=len(NAMES) * one, max_batch_size=4, batch_wait_timeout_s=0.2,
                        torch_threads=1, defaults={"steps": STEPS, "size": SIZE})
        handle = serve.run(app, name="acceptance", route_prefix=None)
        started = time.perf_counter() - t0

        async def client(k):
            out = {}
            for i in range(k, N_REQUESTS, CLIENTS):
                a = bodies[i]["adapter"]
                # one adapter: routed by multiplexed id; a mix, the base model and the bad ones: any replica
                h = handle.options(multiplexed_model_id=a) if isinstance(a, str) and i not in (
                    UNKNOWN_AT, CORRUPT_AT) else handle
                try:
                    out[i] = await h.generate.remote(bodies[i])
                except Exception as e:  # noqa: BLE001 - the bad requests' errors are checked below
                    out[i] = e
            return out

        async def all_clients():
            results = {}
            for part in await asyncio.gather(*(client(k) for k in range(CLIENTS))):
                results.update(part)
            return results

        t1 = time.perf_counter()
        results = asyncio.run(all_clients())
        served = time.perf_counter() - t1

        # the two bad requests: a clear error each, naming the adapter
        unknown, corrupt = results[UNKNOWN_AT], results[CORRUPT_AT]
        assert isinstance(unknown, lora_fast.LoraFormatError) and "no-such-style" in str(unknown), repr(unknown)
        assert isinstance(corrupt, lora_fast.LoraFormatError) and "broken" in str(corrupt), repr(corrupt)

        # every other image equals the request run alone in-process
        pipe = tiny_pipeline()
        for n in NAMES + ("burst",):
            lora_fast.load_lora_weights(pipe, str(tmp_path / f"{n}.safetensors"), adapter_name=n)
        worst = 0.0
        for i, body in enumerate(bodies):
            if i in (UNKNOWN_AT, CORRUPT_AT):
                continue
            assert isinstance(results[i], bytes), (i, body, results[i])
            req = GenerationRequest.from_dict(body, defaults={"steps": STEPS, "size": SIZE})
            lat = decode_npy(results[i])
            assert lat.shape == (4, SIZE, SIZE)
            err = rel_max(lat, alone(pipe, req))
            worst = max(worst, err)
            assert err <= TOL, (i, body, err)

        # a burst of 8 routed by one multiplexed id (so to the replica holding it, as one or two batches): the two
        # bad requests fail alone, the six good ones of their batches succeed
        h = handle.options(multiplexed_model_id="burst")
        h.generate.remote({"prompt": "warm", "seed": 0, "output": "latent"}).result()  # "burst" resident somewhere
        burst = [{"prompt": f"burst {j}", "adapter": "burst", "seed": 50 + j, "output": "latent"} for j in range(8)]
        burst[1]["adapter"], burst[5]["adapter"] = "no-such-style", "broken"

        async def fire(bodies_):
            return await asyncio.gather(*(h.generate.remote(b) for b in bodies_), return_exceptions=True)

        for j, (b, o) in enumerate(zip(burst, asyncio.run(fire(burst)))):
            if j in (1, 5):
                assert isinstance(o, lora_fast.LoraFormatError) and b["adapter"] in str(o), repr(o)
            else:
                assert isinstance(o, bytes), (j, o)
                req = GenerationRequest.from_dict(b, defaults={"steps": STEPS, "size": SIZE})
                assert rel_max(decode_npy(o), alone(pipe, req)) <= TOL

        # the replicas keep serving after the failures: a few more requests, all good
        more = [{"prompt": "after", "adapter": NAMES[j], "seed": j, "output": "latent"} for j in range(4)]

        for b, o in zip(more, asyncio.run(fire_each(handle, more))):
            req = GenerationRequest.from_dict(b, defaults={"steps": STEPS, "size": SIZE})
            assert rel_max(decode_npy(o), alone(pipe, req)) <= TOL

        # each replica's counters (a handle call reaches one replica: ask until both answered)
        per_replica = {}
        for _ in range(200):
            s = handle.stats.remote().result()
            per_replica[s["replica"]] = s
            if len(per_replica) == 2:
                break
        assert len(per_replica) == 2, list(per_replica)
        stats = list(per_replica.values())
        total = lambda f: sum(f(s) for s in stats)  # noqa: E731
        # no replica was replaced (counts kept); the bad requests went through batches and failed alone there
        assert total(lambda s: s["requests"]) == N_REQUESTS + 1 + len(burst) + len(more)
        assert total(lambda s: s["failed"]) == 4
        outcomes = [o for s in stats for o in s["outcomes"]]
        assert any(0 < failed < n for n, failed in outcomes), outcomes  # failures next to successes, one batch
        for s in stats:
            assert s["cache"]["device"]["bytes"] <= 3 * one and s["cache"]["device"]["adapters"] <= 3
        assert total(lambda s: s["cache"]["device"]["evictions"]) > 0
        assert total(lambda s: s["cache"]["host"]["hits"]) > 0
        assert 2 <= total(lambda s: s["cache"]["load_failures"]) <= 4
        assert max(max(s["batch_sizes"], default=0) for s in stats) > 1  # requests shared pipeline calls
        replica_pids = [s["pid"] for s in stats]
        watched = [p for p in me.children(recursive=True) if p.pid not in before]
        watched += [psutil.Process(pid) for pid in replica_pids if pid not in {p.pid for p in watched}]
        cmdlines = " ".join(" ".join(p.cmdline()) for p in watched)
        assert "gcs_server" in cmdlines and "raylet" in cmdlines  # the check below watches the real processes
        watched += [p for p in ray_session_processes(session) if p.pid not in {q.pid for q in watched}]
        print(f"\nray+serve start {started:.1f}s, 60 requests {served:.1f}s, worst rel diff {worst:.2e}, "
              f"per replica: " + "; ".join(
                  f"requests {s['requests']} batches {s['batch_sizes']} device evictions "
                  f"{s['cache']['device']['evictions']} host hits {s['cache']['host']['hits']} loads "
                  f"{s['cache']['loads']}" for s in stats))
    finally:
        serve.shutdown()
        ray.shutdown()

    left = alive(watched)
    assert not left, [(p.pid, p.name()) for p in left]
    assert not alive(ray_session_processes(session))
    assert not alive([p for p in me.children(recursive=True) if p.pid not in before])
