"""A Ray Serve app serving many LoRAs on a tiny random SD1.5-shaped pipeline (runs on a laptop CPU).

    serve run examples.serving.app:app          # from the repository root; HTTP on http://127.0.0.1:8000/

Then, in another shell:

    curl -s -X POST http://127.0.0.1:8000/ -H "serve_multiplexed_model_id: ink" \\
         -d '{"prompt": "a red cat", "seed": 1}' -o cat.png

The adapters are random files written on import to ``$TMPDIR/lora_fast_serving_demo`` (ink, pixel, clay, neon, and
``broken``, which is not a safetensors file). ``python -m examples.serving.client`` does all of this in one process.
"""

import os
import tempfile

from lora_fast.serve import build_app
from lora_fast.serve.demo import write_adapters

ADAPTER_DIR = os.path.join(tempfile.gettempdir(), "lora_fast_serving_demo")
ADAPTERS = ("ink", "pixel", "clay", "neon")
DEFAULTS = {"steps": 4, "size": 32, "guidance_scale": 5.0}


def make_app(mode: str = "per_sample", **options):
    write_adapters(ADAPTER_DIR, ADAPTERS)
    return build_app("lora_fast.serve.demo:tiny_pipeline", ADAPTER_DIR, mode=mode, defaults=DEFAULTS,
                     device_budget_bytes=options.pop("device_budget_bytes", 64 << 20),
                     host_budget_bytes=options.pop("host_budget_bytes", 256 << 20),
                     max_batch_size=options.pop("max_batch_size", 8),
                     batch_wait_timeout_s=options.pop("batch_wait_timeout_s", 0.2),
                     torch_threads=options.pop("torch_threads", 1), **options)


app = make_app()
