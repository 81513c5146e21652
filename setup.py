"""Builds the torch-free C++ core ``lora_fast._C`` (pybind11). Everything else is in pyproject.toml."""
import glob

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

# the sources compile in parallel, one per core (NPY_NUM_BUILD_JOBS=N sets the count): a bare GPU machine builds the
# extension in its 16 cores' time, not serially
ParallelCompile("NPY_NUM_BUILD_JOBS", default=0).install()

ext = Pybind11Extension(
    "lora_fast._C",
    sorted(glob.glob("csrc/*.cpp")),
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=["-O3", "-fno-math-errno", "-pthread"],
    extra_link_args=["-pthread"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
