"""Builds the ``kimi_grpc._C`` extension from csrc/ with torch's cpp_extension.

CPU sources (csrc/bindings.cpp, csrc/cpu/*.cpp) are always compiled. CUDA sources (csrc/cuda/*.cu
and their bindings, csrc/bindings_cuda.cpp) are compiled only when the installed torch is a CUDA
build (``torch.version.cuda``) — never merely because nvcc exists — unless
``KIMI_GRPC_BUILD_CUDA=0``. ``KIMI_GRPC_BUILD_EXT=0`` skips the extension entirely (the package
then runs on its PyTorch reference ops). Install with ``pip install --no-build-isolation -e .``
so the extension builds against the torch already installed (build isolation would fetch another
torch and risk an ABI mismatch).
"""

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def extension_modules():
    if os.environ.get("KIMI_GRPC_BUILD_EXT", "1") == "0":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpu_sources = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("csrc/cpu/*.cpp"))
    sources = ["csrc/bindings.cpp", *cpu_sources]
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("csrc/cuda/*.cu"))
    build_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and bool(cuda_sources)
        and os.environ.get("KIMI_GRPC_BUILD_CUDA", "auto") != "0"
    )
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
        ext = CUDAExtension(
            "kimi_grpc._C",
            [*sources, "csrc/bindings_cuda.cpp", *cuda_sources],
            include_dirs=[str(ROOT / "csrc")],
            define_macros=[("KIMI_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "kimi_grpc._C",
            sources,
            include_dirs=[str(ROOT / "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
