"""The compiled row path (daemon/rowpath/_fast.pyx); everything else is in pyproject.toml.

Built when Cython is importable (make install puts it in the venv and builds in place);
without it, or without a compiler, alertd installs with the pure-Python row path.
"""
from setuptools import Extension, setup

try:
    from Cython.Build import cythonize
except ImportError:
    ext_modules = []
else:
    ext_modules = cythonize(
        [Extension("alertd.rowpath._fast", ["daemon/rowpath/_fast.pyx"],
                   libraries=["crypto", "z"], optional=True,
                   # SHA256_Init & co. are deprecated in OpenSSL 3 but exported: see _fast.pyx.
                   extra_compile_args=["-O2", "-Wno-deprecated-declarations"])],
        compiler_directives={"language_level": 3}, quiet=True)

setup(ext_modules=ext_modules)
