"""Builds mtpspec's C++ CPU kernels (mtpspec/kernels/skinny_gemm.cpp) as a PyTorch C++ extension,
`mtpspec.kernels._skinny_gemm`, when the wheel is built or the package installed (metadata: pyproject.toml).

The extension is compiled against the torch of the build environment, so build without pip's
isolated build environment, after installing torch (which would otherwise pull a torch, possibly a
multi-GB CUDA build, into a throw-away environment):

    pip install torch==2.13.0            # the CPU build: add --index-url https://download.pytorch.org/whl/cpu
    pip install --no-build-isolation .   # or -e . / pip wheel . --no-build-isolation

Flags: the same as the run-time JIT fallback in mtpspec/kernels/__init__.py (`CXX_FLAGS`): -O3 and
-fopenmp, no -march: the translation unit targets baseline x86-64 and only the kernels carry
`target("avx2,fma")` / `target("avx512f,...")` attributes, chosen at run time (`ext.isa()`), so one
wheel runs on any x86-64 CPU and the tests can force the AVX2 path on an AVX-512 machine.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup

# sdist and metadata need no compiler and no torch
_NO_BUILD = {"sdist", "egg_info", "dist_info", "--version", "--name", "check"}

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as e:
    if not _NO_BUILD & set(sys.argv[1:]):
        sys.exit(
            f"mtpspec: building the C++ kernels needs torch in the build environment ({e}).\n"
            "Install torch first and build without pip's isolated build environment:\n"
            "    pip install torch==2.13.0\n"
            "    pip install --no-build-isolation mtpspec        # or: pip install --no-build-isolation ."
        )
    setup()
else:

    class build_ext(BuildExtension):
        """`pip install -e .` compiles into a fresh temporary directory each time; a fixed one lets
        ninja skip the compile when skinny_gemm.cpp and the flags are unchanged (setup.sh re-runs)."""

        def finalize_options(self):
            super().finalize_options()
            if self.editable_mode or self.inplace:
                self.build_temp = os.path.join("build", "temp-inplace")

        def copy_file(self, infile, outfile, *args, **kwargs):
            """Replace an existing library (a new file) instead of writing over it: a running process
            (a training run) has the old one mapped, and rewriting it in place swaps the code and
            constants under that process."""
            if os.path.isfile(outfile) and outfile.endswith((".so", ".pyd")):
                os.unlink(outfile)
            return super().copy_file(infile, outfile, *args, **kwargs)

    # keep in sync with mtpspec/kernels/__init__.py: CXX_FLAGS / LD_FLAGS (the JIT fallback)
    # -g0: Python's own CFLAGS add -g (debug info the JIT build does not have; a slower build)
    setup(
        ext_modules=[
            CppExtension(
                "mtpspec.kernels._skinny_gemm",
                ["mtpspec/kernels/skinny_gemm.cpp", "mtpspec/kernels/quant_gemm.cpp",
                 "mtpspec/kernels/attention.cpp", "mtpspec/kernels/quant_block.cpp"],
                extra_compile_args=["-O3", "-fopenmp", "-g0"],
                extra_link_args=["-fopenmp"],
            )
        ],
        cmdclass={"build_ext": build_ext},
    )
