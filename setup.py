"""Build the optional native hash-chain extension; all metadata lives in pyproject.toml.

``optional=True``: where the system xxHash library (libxxhash.so.0) or a C compiler is missing,
the build goes on without the extension and kvcache hashes with its pure-Python loop.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "kvcache.cache._hashchain",
            ["kvcache/cache/_hashchain.c"],
            libraries=[":libxxhash.so.0"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
