"""Serving many LoRAs with Ray Serve (the ``lora_fast[serve]`` extra): see docs/serving.md.

* :class:`~lora_fast.serve.deployment.LoraDiffusionServer` and :func:`build_app`: a Ray Serve deployment around a
  diffusers pipeline; requests are routed by adapter id (Serve's model multiplexing), grouped with
  ``@serve.batch``, and each batch runs as one pipeline call with a different adapter per sample.
* :class:`~lora_fast.serve.runner.BatchRunner` and :class:`~lora_fast.serve.runner.GenerationRequest`: the batch
  logic without Ray (importing them does not import Ray).
* :mod:`lora_fast.serve.demo`: a tiny random pipeline with a tokenizer and random adapter files, for trying it out
  on a CPU.

``import lora_fast`` never imports this package; ``import lora_fast.serve`` does not import Ray either, only the
names that need it do, on first use.
"""

__all__ = ["BatchRunner", "GenerationRequest", "LoraDiffusionServer", "build_app", "app_builder"]


def __getattr__(name):
    if name in ("BatchRunner", "GenerationRequest"):
        from . import runner

        return getattr(runner, name)
    if name in ("LoraDiffusionServer", "build_app", "app_builder"):
        from . import deployment

        return getattr(deployment, name)
    raise AttributeError(f"module 'lora_fast.serve' has no attribute {name!r}")
