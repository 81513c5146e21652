"""The examples run and check themselves (each returns 0 only when its own check passes)."""

import importlib.util
import os

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_per_sample_denoise_matches_each_single_adapter_run(capsys):
    pytest.importorskip("diffusers")
    example = load_example("per_sample_denoise")
    assert example.main(["--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("max |batched - alone|") == len(example.ENTRIES) and "OK: worst" in out
