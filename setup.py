import os

from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))

setup(
    cffi_modules=["pylazymem/_build.py:ffibuilder"],
    ext_modules=[
        Extension(
            "pylazymem._buffer",
            sources=["csrc/pybuffer.c"],
            extra_compile_args=["-Wall", "-Wextra", "-Werror", "-std=gnu11"],
        )
    ],
)
