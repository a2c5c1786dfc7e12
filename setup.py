"""Build the C kernel as a plain shared library next to the Python package.

The library exports C functions only (no Python C-API): smolq/kernels/__init__.py
loads it with ctypes, which releases the GIL during each call.
"""
import glob

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildCLib(build_ext):
    # ctypes loads the library; there is no PyInit_ symbol to export.
    def get_export_symbols(self, ext):
        return []


kernel = Extension(
    "smolq.kernels._smolq_kernel",
    sources=sorted(glob.glob("smolq/kernels/*.c")),
    include_dirs=["smolq/kernels"],
    extra_compile_args=["-O3", "-std=c99", "-fPIC", "-pthread", "-D_GNU_SOURCE", "-Wall", "-Wno-unused-function"],
    extra_link_args=["-pthread", "-lm"],
)

setup(ext_modules=[kernel], cmdclass={"build_ext": BuildCLib})
