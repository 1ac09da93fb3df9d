"""The optional compiled loops (src/modelcypher/merging/methods/_loops.c); everything else is in
pyproject.toml. Without a C compiler the install goes on, and the torch formulas do their work."""

import hashlib
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCE = Path("src/modelcypher/merging/methods/_loops.c")


class BuildKernels(build_ext):
    def build_extensions(self):
        for ext in self.extensions:
            if self.compiler.compiler_type != "msvc":
                # no fused multiply-add: the loops must give the torch formulas' bits
                ext.extra_compile_args = ["-O3", "-ffp-contract=off", "-std=c99"]
        super().build_extensions()


setup(
    ext_modules=[Extension(
        "modelcypher.merging.methods._loops", [str(SOURCE)], optional=True,
        # the source's hash, as _kernels.source_hash computes it: the loader refuses a stale build
        define_macros=[("MC_SOURCE", f'"{hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]}"')],
    )],
    cmdclass={"build_ext": BuildKernels},
)
