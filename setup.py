"""Only the optional native module; everything else is in pyproject.toml.

Without a C compiler the build goes on without it and the sidecar runs its Python code."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("sidecar._speedups", ["sidecar/_speedups.c"], optional=True,
                  extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"]),
    ],
)
