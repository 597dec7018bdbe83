"""Builds the optional C fast path of the tokenizer; everything else lives in pyproject.toml.

`optional=True`: if no C compiler is available the build still succeeds and tinyllm uses the
pure-Python tokenizer code, which gives identical results (only slower).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tinyllm.tokenizer._fastbpe",
            sources=["tinyllm/tokenizer/_fastbpe.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
