"""Build and install ifbf_fast.

* installs the package ``ifbf_fast`` and maps the top-level ``kernels/`` folder to
  ``ifbf_fast.kernels`` (a top-level ``kernels`` package would clash with the PyPI package of that name);
* builds the extension ``ifbf_fast._C`` from ``csrc/``: the ``*.cpp`` sources always, the ``*.cu``
  sources too when nvcc and a CUDA build of torch are present (no GPU is needed to compile).

Environment:
  IFBF_BUILD_CUDA=0|1   force the CUDA sources off / on (default: on when nvcc and CUDA torch exist;
                        ``1`` fails loudly if they do not)
  TORCH_CUDA_ARCH_LIST  target GPUs (default here "8.0;9.0": A100 and H100/H200)
  CUDA_HOME             the CUDA toolkit; when unset it is looked for next to nvcc and in /usr/local/cuda
  MAX_JOBS              parallel compile jobs (ninja)

torch must be installed before this file runs: build with ``pip install --no-build-isolation``.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - explained to the user
    sys.exit("setup.py: torch must be installed first (pip install -r requirements.txt), then "
             "pip install --no-build-isolation -e .")

HERE = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """The CUDA toolkit folder, or None. A toolkit counts only if it has the runtime headers."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if c and os.path.exists(os.path.join(c, "include", "cuda_runtime.h")) \
                and os.path.exists(os.path.join(c, "bin", "nvcc")):
            return c
    return None


def _want_cuda():
    forced = os.environ.get("IFBF_BUILD_CUDA")
    home = _find_cuda_home()
    ok = home is not None and torch.version.cuda is not None
    if forced == "0":
        return None
    if forced == "1" and not ok:
        sys.exit(f"setup.py: IFBF_BUILD_CUDA=1 but no usable CUDA toolkit (found {home!r}) or torch is "
                 f"not a CUDA build (torch.version.cuda={torch.version.cuda!r})")
    return home if ok else None


def _extensions():
    cpp = sorted(glob.glob("csrc/*.cpp"))
    cu = sorted(glob.glob("csrc/*.cu"))
    # The C++ standard comes from torch (C++20 since 2.13, C++17 before). -g0 drops the debug info that
    # Python's own CFLAGS ask for: torch's headers make it half of each source's compile time (71 -> 32 s
    # for csrc/launcher_node.cpp on the 2-core CI machine); symbol names stay, so backtraces still name
    # the functions.
    cxx_flags = ["-O3", "-g0"]
    # Link the shared libstdc++ by name, ahead of the compiler's own libraries. A toolchain that links
    # libstdc++ statically (seen on a GPU machine whose Python builds with /opt/gcc/bin/g++) otherwise
    # puts a second copy of the C++ library into _C.so: its iostreams then use libtorch's locale
    # state, and formatting the first error message (a double in TORCH_CHECK) crashed the process.
    # tests/ops/test_inplace_abn.py checks the built library for such a copy.
    link_flags = ["-lstdc++"] if sys.platform.startswith("linux") else []
    cuda_home = _want_cuda()
    if cuda_home and cu:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home  # torch caches its own guess (the nvcc wrapper's parent)
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        print(f"setup.py: building CUDA kernels with {cuda_home} for "
              f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        return [cpp_extension.CUDAExtension(
            "ifbf_fast._C", cpp + cu,
            define_macros=[("IFBF_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags,
                                "nvcc": ["-O3", "--use_fast_math", "-lineinfo",
                                         "--expt-relaxed-constexpr"]},
            extra_link_args=link_flags,
        )]
    print("setup.py: building the CPU kernels only (no nvcc/CUDA toolkit or CPU-only torch)")
    return [cpp_extension.CppExtension("ifbf_fast._C", cpp, extra_compile_args=cxx_flags,
                                       extra_link_args=link_flags)]


def _packages():
    pkgs = ["ifbf_fast"]
    for root, _dirs, files in os.walk(os.path.join(HERE, "ifbf_fast")):
        if "__init__.py" in files and "__pycache__" not in root:
            rel = os.path.relpath(root, HERE).replace(os.sep, ".")
            if rel not in pkgs:
                pkgs.append(rel)
    return pkgs + ["ifbf_fast.kernels"]


class BuildExt(cpp_extension.BuildExtension):
    """torch's BuildExtension with ninja and a build folder that outlives the build.

    ``pip install -e .`` builds in a fresh temporary folder each time, so every install recompiled the
    whole extension (about 5 minutes with the CUDA sources on 2 cores). With the objects kept in
    ``build/ifbf_fast-<python>`` (ignored by git), ninja recompiles only the sources that changed since
    the last build (it tracks header dependencies too) and a repeat install takes seconds.
    ``IFBF_BUILD_TEMP`` moves that folder.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("use_ninja", True)
        super().__init__(*args, **kwargs)

    def finalize_options(self):
        super().finalize_options()
        tag = f"py{sys.version_info.major}{sys.version_info.minor}"
        self.build_temp = os.environ.get("IFBF_BUILD_TEMP", os.path.join(HERE, "build", f"ifbf_fast-{tag}"))


setup(
    name="ifbf_fast",
    version="0.1.0",
    description="IFBFNet (Sensors 2021) for Cityscapes with fused Triton / C++ / CUDA fast paths",
    python_requires=">=3.10",
    packages=_packages(),
    package_dir={"ifbf_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.11",
        "triton>=3.6",
        "numpy",
        "opencv-python-headless",
        "nvidia-dali-cuda130",
        "cityscapesscripts",
        "pyyaml",
        "tqdm",
        "tensorboard",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark", "pytest-timeout", "torchvision", "expecttest"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
