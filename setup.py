"""The compiled part of rdml-dist: the Rényi step's element-wise passes (rdml_dist/kernels/renyi_passes.c).

Everything else is in pyproject.toml. The extension is optional: where it cannot be built (no C
compiler), the install goes on and the step runs in torch alone (rdml_dist/kernels/native.py).
"""

import sys

from setuptools import Extension, setup

# -O3 and OpenMP's simd pragmas (no OpenMP runtime) vectorise the loops; no -ffast-math: the passes
# must keep IEEE semantics (NaN checks, no reassociation beyond the pragmas' reductions); no fused
# multiply-adds (-ffp-contract=off), so that the clones for every vector width round alike.
UNIX_FLAGS = ["-O3", "-fopenmp-simd", "-ffp-contract=off", "-std=gnu11"]

setup(
    ext_modules=[
        Extension(
            "rdml_dist.kernels._renyi_passes",
            sources=["rdml_dist/kernels/renyi_passes.c"],
            extra_compile_args=[] if sys.platform == "win32" else UNIX_FLAGS,
            optional=True,
        )
    ]
)
