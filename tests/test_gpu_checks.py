"""gpu_checks.py runs in CI on a tiny model on the CPU, so the GPU suite's checks do not rot between GPU runs."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
pytest.importorskip("diffusers")
import gpu_checks  # noqa: E402


def test_ulp_spacing_in_each_dtype():
    ref = torch.tensor([1.0, -1.0, 3.0, 2.0**-20, 0.0], dtype=torch.float64)
    assert gpu_checks.ulp_at(ref, torch.float16).tolist() == [2.0**-10, 2.0**-10, 2.0**-9, 2.0**-24, 2.0**-24]
    assert gpu_checks.ulp_at(ref, torch.bfloat16).tolist()[:3] == [2.0**-7, 2.0**-7, 2.0**-6]
    assert gpu_checks.ulp_at(ref, torch.float32).tolist()[:3] == [2.0**-23, 2.0**-23, 2.0**-22]


def test_tiny_run_on_the_cpu_passes_and_writes_its_figures(tmp_path):
    rc = gpu_checks.main(["--device", "cpu", "--size", "tiny", "--dtype", "bf16", "--rank", "8", "--file-gb", "0.004",
                          "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_checks.json").read_text())
    assert rc == 0, report["failures"]
    fuse = report["fuse"][0]
    assert fuse["modules"] > 50 and fuse["changed_after_cycles"] == 0 and fuse["layers_differing_from_cpu_kernel"] == 0
    assert fuse["elements_over_error_bound"] == 0 and 0 < fuse["record_fraction"] < 1
    assert report["load_file"]["file_bytes"] >= 4e6 and "round1" in report["load_file"]


def test_a_wrong_fuse_is_reported(tmp_path, monkeypatch):
    """The float64 comparison catches a fuse that is off by one ulp on one element."""
    import lora_fast

    real = lora_fast.fuse_lora

    def off_by_one(target, *a, **k):
        real(target, *a, **k)
        w = next(m.weight for n, m in target["unet"].named_modules() if n.endswith("transformer_blocks.0.attn1.to_q"))
        with torch.no_grad():
            w.view(torch.int16)[0, 0] += 1

    monkeypatch.setattr(gpu_checks.lora_fast, "fuse_lora", off_by_one)
    rc = gpu_checks.main(["--device", "cpu", "--size", "tiny", "--dtype", "fp16", "--rank", "4", "--file-gb", "0.001",
                          "--out", str(tmp_path)])
    assert rc == 1
