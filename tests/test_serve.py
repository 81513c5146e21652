"""lora_fast.serve: batches of requests with different adapters as one pipeline call; the Ray Serve deployment.

The first part runs the batch runner without Ray; the second starts one local Ray instance for the module (skipped
when ray is not installed: ``pip install -c constraints.txt -e ".[serve]"``). Every test that runs the pipeline is
marked slow: on a loaded 2-core machine the module takes about 2 minutes (Ray start-up ~25 s of it).
"""

import asyncio
import io
import socket
import time
import urllib.error
import urllib.request
import json

import pytest
import torch

import lora_fast

pytest.importorskip("diffusers")

from lora_fast.serve.demo import tiny_pipeline, write_adapters  # noqa: E402
from lora_fast.serve.runner import BatchRunner, GenerationRequest, decode_npy  # noqa: E402

NAMES = ("ink", "pixel", "clay", "neon")
STEPS, SIZE = 2, 16
TOL = 1e-4  # max |batched - alone| / max |alone|, fp32 (as tests/test_per_sample.py on a tiny UNet with CFG)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    write_adapters(d, NAMES)
    return d


@pytest.fixture(scope="module")
def reference(lora_dir):
    """Each request alone, on a separate pipeline with the adapters loaded directly (no cache, no batching)."""
    pipe = tiny_pipeline()
    for n in NAMES:
        lora_fast.load_lora_weights(pipe, str(lora_dir / f"{n}.safetensors"), adapter_name=n)
    memo = {}

    def run(req: GenerationRequest) -> torch.Tensor:
        key = (req.prompt, str(req.adapter), req.lora_scale, req.seed, req.steps, req.height, req.guidance_scale)
        if key not in memo:
            memo[key] = alone(pipe, req)
        return memo[key]

    return run


def alone(pipe, req: GenerationRequest) -> torch.Tensor:
    """The request alone on an in-process pipeline with its adapters loaded directly (no cache, no batching)."""
    w = req.weights()
    if w:
        lora_fast.enable_lora(pipe)
        lora_fast.set_adapters(pipe, list(w), list(w.values()))
    else:
        lora_fast.disable_lora(pipe)
    with torch.no_grad():
        return pipe(prompt=[req.prompt], num_inference_steps=req.steps, height=req.height, width=req.width,
                    guidance_scale=req.guidance_scale, output_type="latent",
                    generator=[torch.Generator().manual_seed(req.seed)]).images[0]


def rel_max(out, ref) -> float:
    out, ref = torch.as_tensor(out).double(), torch.as_tensor(ref).double()
    return ((out - ref).abs().max() / ref.abs().max()).item()


def request(prompt, adapter, seed, **kw):
    return GenerationRequest.from_dict(dict(prompt=prompt, adapter=adapter, seed=seed, steps=STEPS, size=SIZE,
                                            output="latent", **kw))


MIXED = [("a red cat", "ink", 1, {}), ("a blue dog", "pixel", 2, {"lora_scale": 0.5}), ("a house", None, 3, {}),
         ("a tree", {"clay": 0.6, "neon": 0.4}, 4, {}), ("a red cat", "neon", 1, {})]


def make_runner(lora_dir, mode="per_sample", device_budget=1 << 30):
    pipe = tiny_pipeline()
    cache = lora_fast.AdapterCache(pipe, device_budget_bytes=device_budget, host_budget_bytes=1 << 30,
                                   source=str(lora_dir))
    return BatchRunner(pipe, cache, mode)


@pytest.mark.slow
def test_one_call_serves_every_request_and_each_matches_its_single_run(lora_dir, reference):
    runner = make_runner(lora_dir)
    reqs = [request(p, a, s, **kw) for p, a, s, kw in MIXED] + [request("x", "missing-lora", 5)]
    out = runner.run(reqs)
    assert runner.stats.batch_sizes == [len(MIXED)]  # one denoising loop for all the good requests
    assert isinstance(out[-1], lora_fast.LoraFormatError) and "missing-lora" in str(out[-1])
    lat = [decode_npy(o) for o in out[:-1]]
    for r, x in zip(reqs, lat):
        assert x.shape == (4, SIZE, SIZE)
        assert rel_max(x, reference(r)) <= TOL, r
    assert rel_max(lat[0], lat[4]) > 100 * TOL  # same prompt and seed, another adapter: really another image


@pytest.mark.slow
def test_a_batch_whose_adapters_do_not_fit_together_is_split(lora_dir, reference):
    one = lora_fast.cache.adapter_nbytes(lora_fast.read_lora(str(lora_dir / "ink.safetensors")))
    runner = make_runner(lora_dir, device_budget=2 * one)
    reqs = [request("a", "ink", 1), request("b", "pixel", 2), request("c", "clay", 3), request("d", "ink", 4)]
    out = runner.run(reqs)
    assert runner.stats.batch_sizes == [3, 1] and runner.stats.splits == 1  # ink, pixel, ink; then clay
    for r, o in zip(reqs, out):
        assert rel_max(decode_npy(o), reference(r)) <= TOL


@pytest.mark.slow
def test_fuse_mode_switches_exactly(lora_dir, reference):
    from lora_fast.targets import resolve_components

    runner = make_runner(lora_dir, mode="fuse")

    def weights():
        return {f"{c}.{k}": v.clone() for c, m in resolve_components(runner.pipe).items()
                for k, v in m.state_dict().items()}

    base = weights()
    seq = [request("a cat", "ink", 1), request("a cat", "pixel", 1), request("a cat", None, 1),
           request("a cat", "ink", 1), request("a cat", {"ink": 0.5, "pixel": 0.5}, 1)]
    outs = [decode_npy(runner.run([r])[0]) for r in seq[:3]]
    after = weights()  # back on the base model: every bit as before
    assert all(torch.equal(base[k], after[k]) for k in base)
    outs += [decode_npy(runner.run([r])[0]) for r in seq[3:]]
    assert (outs[0] == outs[3]).all()  # ink, pixel, base, ink: the second ink image is bit-identical
    for r, o in zip(seq, outs):
        assert rel_max(o, reference(r)) <= 1e-3  # fused weights round once: close to the live run, not equal
    assert runner.stats.switches == 5
    batch = runner.run([request("a", "pixel", 1), request("b", "ink", 2), request("c", "pixel", 3)])
    assert runner.stats.switches == 7 and runner.stats.batch_sizes[-2:] == [2, 1]  # grouped by adapter
    assert all(isinstance(b, bytes) for b in batch)
    bad = runner.run([request("a", "missing", 1)])[0]
    assert isinstance(bad, lora_fast.LoraFormatError)
    runner.close()
    after = weights()
    assert all(torch.equal(base[k], after[k]) for k in base)


def test_requests_are_validated():
    with pytest.raises(ValueError, match="prompt"):
        GenerationRequest.from_dict({"adapter": "x"})
    with pytest.raises(ValueError, match="unknown request fields"):
        GenerationRequest.from_dict({"prompt": "a", "lora": "x"})
    with pytest.raises(ValueError, match="steps"):
        GenerationRequest.from_dict({"prompt": "a", "steps": 0})
    with pytest.raises(ValueError, match="adapter"):
        GenerationRequest.from_dict({"prompt": "a", "adapter": {}})
    r = GenerationRequest.from_dict({"prompt": "a", "size": [32, 48]}, defaults={"steps": 3}, adapter_id="ink")
    assert (r.height, r.width, r.steps, r.adapter, r.weights()) == (32, 48, 3, "ink", {"ink": 1.0})


# ------------------------------------------------------------------------------------------------ Ray Serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ray(ray) -> None:
    """ray.init for the tests, retried once when Ray's own head processes do not come up in time (its GCS server
    occasionally misses Ray's start-up deadline on a loaded 2-core machine, right after another test's shutdown)."""
    kw = dict(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray.init(**kw)
    except RuntimeError as e:
        if "Timed out waiting for file" not in str(e):
            raise
        ray.shutdown()
        ray.init(**kw)


@pytest.fixture(scope="module")
def serve_apps(lora_dir):
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from lora_fast.serve import build_app

    t0 = time.perf_counter()
    start_ray(ray)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = dict(pipeline="lora_fast.serve.demo:tiny_pipeline", adapters=str(lora_dir), torch_threads=1,
                  defaults={"steps": STEPS, "size": SIZE}, ray_actor_options={"num_cpus": 0.5})
    batched = serve.run(build_app(max_batch_size=8, batch_wait_timeout_s=1.0, **common), name="batched",
                        route_prefix="/batched")
    fused = serve.run(build_app(mode="fuse", **common), name="fused", route_prefix="/fused")
    startup = time.perf_counter() - t0
    yield {"batched": batched, "fused": fused, "url": f"http://127.0.0.1:{port}", "startup": startup}
    serve.shutdown()
    ray.shutdown()


def post(url, body, adapter=None):
    headers = {"Content-Type": "application/json"}
    if adapter:
        headers["serve_multiplexed_model_id"] = adapter
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers.get("content-type"), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type"), e.read()


@pytest.mark.slow
def test_serve_batches_concurrent_requests_with_different_adapters(serve_apps, reference):
    handle = serve_apps["batched"]

    async def main():
        calls = []
        for p, a, s, kw in MIXED:
            h = handle.options(multiplexed_model_id=a) if isinstance(a, str) else handle
            calls.append(h.generate.remote(dict(prompt=p, adapter=a, seed=s, output="latent", **kw)))
        calls.append(handle.options(multiplexed_model_id="missing-lora").generate.remote(
            dict(prompt="x", seed=9, output="latent")))
        return await asyncio.gather(*calls, return_exceptions=True)

    out = asyncio.run(main())
    assert isinstance(out[-1], lora_fast.LoraFormatError), out[-1]  # only the bad id fails
    for (p, a, s, kw), o in zip(MIXED, out):
        assert isinstance(o, bytes), o
        ref = reference(GenerationRequest.from_dict(dict(prompt=p, adapter=a, seed=s, steps=STEPS, size=SIZE, **kw)))
        assert rel_max(decode_npy(o), ref) <= TOL
    stats = handle.stats.remote().result()
    assert max(stats["batch_sizes"]) > 1, stats["batch_sizes"]  # different adapters shared a pipeline call
    assert stats["cache"]["loads"] == 4 and stats["cache"]["load_failures"] == 1


@pytest.mark.slow
def test_serve_http_returns_png_and_a_bad_adapter_fails_only_its_request(serve_apps):
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    url = serve_apps["url"] + "/batched"
    bodies = [({"prompt": "a cat", "adapter": "ink", "seed": 1}, "ink"),
              ({"prompt": "a dog", "seed": 2}, "pixel"),  # the adapter comes from the multiplexed id
              ({"prompt": "a cow", "adapter": "broken", "seed": 3}, "broken"),
              ({"prompt": "a hen", "seed": 4, "size": 24}, None)]
    with ThreadPoolExecutor(len(bodies)) as ex:
        out = list(ex.map(lambda b: post(url, *b), bodies))
    for i in (0, 1, 3):
        status, ctype, data = out[i]
        assert status == 200 and ctype == "image/png", data[:200]
        img = Image.open(io.BytesIO(data))
        assert img.format == "PNG" and img.size == ((24, 24) if i == 3 else (SIZE, SIZE))
    status, ctype, data = out[2]
    assert status == 400 and json.loads(data)["type"] == "LoraFormatError"
    assert post(url, {"prompt": 3})[0] == 400


@pytest.mark.slow
def test_serve_fuse_mode_switches_and_restores_the_weights_exactly(serve_apps):
    handle = serve_apps["fused"]
    base = handle.model_digest.remote().result()
    seq = ["ink", "pixel", None, "ink"]
    outs = []
    for a in seq:
        h = handle.options(multiplexed_model_id=a) if a else handle
        outs.append(h.generate.remote(dict(prompt="a cat", seed=1, output="latent")).result())
        if a is None:
            assert handle.model_digest.remote().result() == base  # unfused: bit-identical to the start
    assert outs[0] == outs[3] and outs[0] != outs[1]
    stats = handle.stats.remote().result()
    assert stats["mode"] == "fuse" and stats["switches"] == 4


@pytest.mark.slow
def test_serving_example_client_runs_and_checks_itself(tmp_path):
    """examples/serving/client.py in its own process (its own Ray instance): every good request a PNG, the broken
    adapter a LoraFormatError, several adapters in one pipeline call."""
    import os
    import subprocess
    import sys

    pytest.importorskip("ray")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "examples.serving.client", "--requests", "4", "--out",
                           str(tmp_path), "--port", str(free_port())], cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "\nOK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(list(tmp_path.glob("*.png"))) == 4
