"""The part of the Ray Serve deployment that needs no Ray: requests, and running a batch of them on a pipeline.

:class:`BatchRunner` takes a list of :class:`GenerationRequest` (one ``@serve.batch`` call) and returns one result
per request (PNG or ``.npy`` bytes, or the exception that request failed with). Two modes:

* ``"per_sample"`` (default): requests that share steps, size, guidance and output kind run as **one** pipeline
  call inside :func:`lora_fast.per_sample_adapters`, each with its own adapter (or mix, or none) and its own seed
  (a list of ``torch.Generator``, one per prompt). Their adapters are pinned in the :class:`~lora_fast.AdapterCache`
  for the call. A request whose adapter cannot be loaded fails alone; a group whose adapters do not fit the device
  budget together is split into several calls.
* ``"fuse"``: for single-adapter traffic. The requested adapter (or mix, with its scale) is fused into the weights
  on first use and stays fused while requests keep asking for it; a request for anything else unfuses exactly
  (bit for bit) and fuses the new one. Requests are grouped by adapter so a batch switches at most once per group.
"""

from __future__ import annotations

import io
import math
import numbers
import threading
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

import lora_fast
from lora_fast.cache import AdapterBudgetError, AdapterCache
from lora_fast.errors import LoraFormatError

__all__ = ["GenerationRequest", "BatchRunner", "encode_png", "encode_npy", "decode_npy"]

MODES = ("per_sample", "fuse")
OUTPUTS = ("png", "latent")


def _number(value, what, *, integer=False, positive=False):
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if ok and positive:
        ok = value > 0
    if not ok:
        raise ValueError(f"{what} must be a {'positive ' if positive else ''}{'integer' if integer else 'number'}, "
                         f"got {value!r}")
    return int(value) if integer else float(value)


@dataclass
class GenerationRequest:
    """One image to generate.

    ``adapter``: None (the base model), an adapter id, or a mix ``{id: weight}``. ``lora_scale`` multiplies the
    adapter weights (for a plain LoRA, the same as diffusers' ``cross_attention_kwargs={"scale": ...}``).
    ``size``: the image height and width in pixels. ``output``: ``"png"`` (PNG bytes) or ``"latent"`` (the final
    latents as ``.npy`` bytes, float32, shape ``(C, H, W)``)."""

    prompt: str
    adapter: Union[None, str, dict] = None
    lora_scale: float = 1.0
    seed: int = 0
    steps: int = 20
    height: int = 512
    width: int = 512
    guidance_scale: float = 7.5
    negative_prompt: Optional[str] = None
    output: str = "png"

    @classmethod
    def from_dict(cls, body: dict, *, defaults: Optional[dict] = None, adapter_id: Optional[str] = None
                  ) -> "GenerationRequest":
        """Validate a request body (ValueError naming the field). ``size`` may be one int or ``[height, width]``;
        ``defaults`` fills fields the body leaves out; ``adapter_id`` (Serve's multiplexed model id) is the adapter
        when the body names none."""
        if not isinstance(body, dict):
            raise ValueError(f"a request is a JSON object, got {type(body).__name__}")
        known = {"prompt", "adapter", "lora_scale", "seed", "steps", "size", "height", "width", "guidance_scale",
                 "negative_prompt", "output"}
        unknown = sorted(set(body) - known)
        if unknown:
            raise ValueError(f"unknown request fields {unknown} (known: {sorted(known)})")
        d = dict(defaults or {})
        d.update(body)
        if "size" in d:
            size = d.pop("size")
            if isinstance(size, (list, tuple)) and len(size) == 2:
                d["height"], d["width"] = size
            else:
                d["height"] = d["width"] = size
        prompt = d.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {prompt!r}")
        adapter = d.get("adapter")
        if adapter is None and adapter_id:
            adapter = adapter_id
        if isinstance(adapter, dict):
            if not adapter:
                raise ValueError("adapter: an empty mix; use null for the base model")
            adapter = {k: _number(v, f"adapter weight of {k!r}") for k, v in adapter.items()}
            bad = [k for k in adapter if not isinstance(k, str) or not k]
            if bad:
                raise ValueError(f"adapter: ids must be non-empty strings, got {bad}")
        elif adapter is not None and (not isinstance(adapter, str) or not adapter):
            raise ValueError(f"adapter must be null, an id or {{id: weight}}, got {adapter!r}")
        neg = d.get("negative_prompt")
        if neg is not None and not isinstance(neg, str):
            raise ValueError(f"negative_prompt must be a string, got {neg!r}")
        output = d.get("output", "png")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        seed = _number(d.get("seed", 0), "seed", integer=True)
        if not 0 <= seed < 2 ** 63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        return cls(prompt=prompt, adapter=adapter, lora_scale=_number(d.get("lora_scale", 1.0), "lora_scale"),
                   seed=seed, steps=_number(d.get("steps", 20), "steps", integer=True, positive=True),
                   height=_number(d.get("height", 512), "height", integer=True, positive=True),
                   width=_number(d.get("width", 512), "width", integer=True, positive=True),
                   guidance_scale=_number(d.get("guidance_scale", 7.5), "guidance_scale"), negative_prompt=neg,
                   output=output)

    def adapter_ids(self) -> list[str]:
        if self.adapter is None:
            return []
        return [self.adapter] if isinstance(self.adapter, str) else list(self.adapter)

    def weights(self) -> dict:
        """{id: weight × lora_scale} (empty for the base model)."""
        if self.adapter is None:
            return {}
        mix = {self.adapter: 1.0} if isinstance(self.adapter, str) else self.adapter
        return {k: w * self.lora_scale for k, w in mix.items() if w * self.lora_scale != 0.0}

    def call_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call."""
        return (self.steps, self.height, self.width, self.guidance_scale, self.output)


def encode_png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def encode_npy(tensor: torch.Tensor) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, tensor.detach().float().cpu().numpy(), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes):
    import numpy as np

    return np.load(io.BytesIO(data), allow_pickle=False)


@dataclass
class RunnerStats:
    batch_sizes: list = field(default_factory=list)  # requests per pipeline call, in order
    requests: int = 0
    failed: int = 0
    switches: int = 0  # fuse mode: fuse/unfuse switches
    splits: int = 0  # per-sample groups split because their adapters did not fit the device budget together
    outcomes: list = field(default_factory=list)  # (requests, failed) per run() call (one @serve.batch), in order


class BatchRunner:
    """Runs batches of :class:`GenerationRequest` on ``pipe`` with adapters from ``cache`` (see the module doc).

    One batch at a time (a lock): a diffusers pipeline is not re-entrant (its scheduler holds per-call state)."""

    def __init__(self, pipe, cache: AdapterCache, mode: str = "per_sample", *, components=None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.pipe = pipe
        self.cache = cache
        self.mode = mode
        self.components = components
        self.stats = RunnerStats()
        self._lock = threading.Lock()
        self._fused_key: Optional[tuple] = None  # fuse mode: what is fused now (() for nothing)
        self._fused_lease = None
        self.on_batch = None  # optional callback(size) per pipeline call (metrics)

    # --------------------------------------------------------------------------------------- entry point

    def run(self, requests: list) -> list:
        """One result per request: bytes, or the exception it failed with (never raises for one request)."""
        with self._lock:
            results: list = [None] * len(requests)
            groups: dict[tuple, list[int]] = {}
            for i, r in enumerate(requests):
                key = r.call_key() if self.mode == "per_sample" else (r.call_key(), self._fuse_key(r))
                groups.setdefault(key, []).append(i)
            order = list(groups)
            if self.mode == "fuse":  # what is fused already goes first: no switch for it
                order.sort(key=lambda k: k[1] != self._fused_key)
            for key in order:
                idx = groups[key]
                batch = [requests[i] for i in idx]
                out = self._run_per_sample(batch) if self.mode == "per_sample" else self._run_fused(batch)
                for i, res in zip(idx, out):
                    results[i] = res
            failed = sum(isinstance(r, BaseException) for r in results)
            self.stats.requests += len(requests)
            self.stats.failed += failed
            self.stats.outcomes.append((len(requests), failed))
            return results

    def close(self) -> None:
        """Fuse mode: unfuse and release the fused adapters."""
        with self._lock:
            self._unfuse()

    # --------------------------------------------------------------------------------------- per-sample

    def _run_per_sample(self, batch: list) -> list:
        results: list = [None] * len(batch)
        todo = list(range(len(batch)))
        while todo:
            lease = self.cache.lease()
            taken, later = [], []
            try:
                for i in todo:
                    try:
                        lease.add(batch[i].adapter_ids())
                        taken.append(i)
                    except AdapterBudgetError as e:  # does not fit next to the others: a later call
                        if taken:
                            later.append(i)
                        else:
                            results[i] = e
                    except (LoraFormatError, ValueError) as e:
                        results[i] = e
                if later:
                    self.stats.splits += 1
                if taken:
                    entries = [self._entry(batch[i]) for i in taken]
                    try:
                        with lease.running():
                            lora_fast.enable_lora(self.pipe)
                            with lora_fast.per_sample_adapters(self.pipe, entries, components=self.components):
                                outs = self._call([batch[i] for i in taken])
                        for i, o in zip(taken, outs):
                            results[i] = o
                    except Exception as e:  # the pipeline call failed: every request of it fails with that error
                        for i in taken:
                            results[i] = e
            finally:
                lease.close()
            todo = later
        return results

    def _entry(self, req):
        w = req.weights()
        if not w:
            return None
        return {self.cache.name_of(k): v for k, v in w.items()}

    # --------------------------------------------------------------------------------------- fuse

    @staticmethod
    def _fuse_key(req) -> tuple:
        return tuple(sorted(req.weights().items()))

    def _unfuse(self) -> None:
        if self._fused_key:
            lora_fast.unfuse_lora(self.pipe)
        if self._fused_lease is not None:
            self._fused_lease.close()
            self._fused_lease = None
        self._fused_key = ()

    def _run_fused(self, batch: list) -> list:
        key = self._fuse_key(batch[0])
        try:
            if key != self._fused_key:
                self._switch(key)
            with (self._fused_lease or self.cache.lease()).running():
                lora_fast.disable_lora(self.pipe)  # fused adapters stay fused; nothing else runs live
                try:
                    return self._call(batch)
                finally:
                    lora_fast.enable_lora(self.pipe)
        except Exception as e:
            return [e] * len(batch)

    def _switch(self, key: tuple) -> None:
        """Unfuse what is fused (exact), then load and fuse ``key``; on failure the weights are the base ones."""
        self.stats.switches += 1
        if self._fused_key:
            with self.cache.lease().running():  # weights change: not while anything else runs on the pipeline
                lora_fast.unfuse_lora(self.pipe)
        if self._fused_lease is not None:
            self._fused_lease.close()
            self._fused_lease = None
        self._fused_key = ()
        if not key:
            return
        lease = self.cache.lease()
        try:
            names = lease.add([k for k, _ in key])
            with lease.running():
                lora_fast.fuse_lora(self.pipe, lora_scale=1.0, adapter_names=names,
                                    adapter_weights=[w for _, w in key])
        except BaseException:
            lease.close()
            raise
        self._fused_lease = lease
        self._fused_key = key

    # --------------------------------------------------------------------------------------- the call

    def _call(self, reqs: list) -> list:
        """One pipeline call for requests sharing call_key(); returns PNG or .npy bytes per request."""
        first = reqs[0]
        device = getattr(self.pipe, "device", torch.device("cpu"))
        gen_device = "cpu" if torch.device(device).type == "mps" else device
        kwargs = dict(prompt=[r.prompt for r in reqs], num_inference_steps=first.steps, height=first.height,
                      width=first.width, guidance_scale=first.guidance_scale,
                      generator=[torch.Generator(gen_device).manual_seed(r.seed) for r in reqs],
                      output_type="latent" if first.output == "latent" else "pil")
        if any(r.negative_prompt for r in reqs):
            kwargs["negative_prompt"] = [r.negative_prompt or "" for r in reqs]
        if self.on_batch is not None:
            self.on_batch(len(reqs))
        self.stats.batch_sizes.append(len(reqs))
        with torch.inference_mode():
            images = self.pipe(**kwargs).images
        if first.output == "latent":
            return [encode_npy(images[i]) for i in range(len(reqs))]
        return [encode_png(img) for img in images]
