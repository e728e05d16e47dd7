"""Builds lorafuse's one optional C extension (src/lorafuse/_fastcast.c: vectorised dtype conversions); the rest
of the package is configured in pyproject.toml. Where it cannot be compiled (no C compiler), the install goes on
without it and lorafuse uses its numpy paths (lorafuse/fastcast.py)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("lorafuse._fastcast", ["src/lorafuse/_fastcast.c"], extra_compile_args=["-O2"], optional=True)
    ]
)
