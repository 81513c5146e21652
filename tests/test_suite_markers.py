"""The test suite's own conventions that the GPU suite relies on."""

import pathlib
import re

TESTS = pathlib.Path(__file__).parent


def test_gpu_tests_are_marked_cuda_not_skipped_by_hand():
    """A test that skips itself without CUDA would be left out of ``pytest -m cuda`` (the GPU suite's selection);
    ``@pytest.mark.cuda`` both selects it there and skips it elsewhere (conftest)."""
    pattern = re.compile(r"skip(if)?\(.*cuda\.is_available")
    offenders = [f"{path.name}:{i}" for path in sorted(TESTS.glob("*.py")) if path.name not in ("conftest.py", pathlib.Path(__file__).name)
                 for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, f"use @pytest.mark.cuda instead of a hand-written CUDA skip: {offenders}"


def test_every_declared_marker_is_used():
    """A marker declared in pyproject.toml but put on no test selects nothing (``-m slow`` would run zero tests)."""
    import tomllib

    declared = [m.split(":")[0] for m in tomllib.loads((TESTS.parent / "pyproject.toml").read_text())
                ["tool"]["pytest"]["ini_options"]["markers"]]
    text = "\n".join(p.read_text() for p in sorted(TESTS.glob("test_*.py")))
    unused = [m for m in declared if f"pytest.mark.{m}" not in text]
    assert not unused, f"declared but on no test: {unused}"


def test_cuda_marker_skips_without_a_gpu(pytester):
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    pytester.makepyfile("""
        import pytest, torch

        @pytest.mark.cuda
        def test_needs_gpu():
            torch.zeros(1, device="cuda")

        def test_plain():
            pass
    """)
    import torch

    result = pytester.runpytest("-q", "-p", "no:cacheprovider")
    if torch.cuda.is_available():
        result.assert_outcomes(passed=2)
    else:
        result.assert_outcomes(passed=1, skipped=1)
    result = pytester.runpytest("-q", "-p", "no:cacheprovider", "-m", "cuda")
    outcomes = result.parseoutcomes()
    assert outcomes.get("deselected") == 1 and (outcomes.get("passed", 0) + outcomes.get("skipped", 0)) == 1
