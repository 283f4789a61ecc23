"""Lazy, cached, process-safe compilation of the multi-scale deformable attention extensions.

Nothing is compiled at import. :func:`load_extension` builds (or loads a previous build of) the extension for
one device type the first time it is asked for it, with :func:`torch.utils.cpp_extension.load`:

* sources: ``hf_dino/kernels/csrc`` inside the installed package (wheel), or the repository's top-level
  ``kernels/`` directory in a source checkout; ``HF_DINO_KERNELS_SOURCES`` overrides both;
* build directory: ``<cache>/<device>-torch<version>-cp<python>-<hash>`` where the hash covers the sources,
  the compiler flags and (CUDA) the target architectures, and ``<cache>`` is ``HF_DINO_KERNELS_CACHE`` or
  ``~/.cache/hf_dino/kernels`` (``$XDG_CACHE_HOME`` honoured);
* a file lock next to the build directory, so parallel processes (accelerate, pytest-xdist, several ranks on
  one node) build once and the others load the result; a ``BUILD_OK`` marker is written only after a
  successful build, so a build killed half-way is redone;
* when the build is impossible (sources missing, no C++ compiler, no ninja, no nvcc / CUDA torch, compiler
  error) one warning is emitted per device type and process and ``None`` is returned: callers then use the
  pure-PyTorch implementation.

``HF_DINO_DISABLE_CUSTOM_KERNELS=1`` disables all of it (checked by the callers, see :func:`kernels_disabled`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

ENV_DISABLE = "HF_DINO_DISABLE_CUSTOM_KERNELS"
ENV_CACHE = "HF_DINO_KERNELS_CACHE"
ENV_SOURCES = "HF_DINO_KERNELS_SOURCES"
ENV_VERBOSE = "HF_DINO_KERNELS_VERBOSE"

DEVICE_TYPES = ("cpu", "cuda")

# Files compiled for each device type, and the headers they include (part of the source hash).
_SOURCES = {
    "cpu": ("msda_cpu.cpp",),
    "cuda": ("msda_cuda.cu", "msda_cuda_bindings.cpp"),
}
_HEADERS = {
    "cpu": ("msda_common.h", "msda_cpu_kernel.h"),
    "cuda": ("msda_common.h",),
}

_lock = threading.Lock()
_modules: dict[str, ModuleType | None] = {}  # device type -> module, or None once a build failed
_errors: dict[str, str] = {}


class KernelBuildError(RuntimeError):
    """The extension cannot be built here (missing tool chain, sources, compile error)."""


def kernels_disabled() -> bool:
    """True when ``HF_DINO_DISABLE_CUSTOM_KERNELS`` is set to 1 / true / yes / on."""
    return os.environ.get(ENV_DISABLE, "").strip().lower() in ("1", "true", "yes", "on")


def source_dir() -> Path | None:
    """Directory holding the C++/CUDA sources, or None when they are not shipped (e.g. Hub remote code)."""
    override = os.environ.get(ENV_SOURCES)
    here = Path(__file__).resolve().parent
    candidates = [Path(override)] if override else [here / "csrc", here.parents[2] / "kernels"]
    for candidate in candidates:
        if all((candidate / name).is_file() for name in _SOURCES["cpu"] + _SOURCES["cuda"]):
            return candidate
    return None


def cache_root() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "hf_dino" / "kernels"


def _is_msvc() -> bool:
    return sys.platform == "win32"


def _cpu_flags() -> tuple[list[str], list[str]]:
    if _is_msvc():
        return ["/O2", "/openmp"], []
    if sys.platform == "darwin":  # Apple clang has no -fopenmp; at::parallel_for still works (serially)
        return ["-O3"], []
    return ["-O3", "-fopenmp"], ["-fopenmp"]


def cuda_arch_list() -> str:
    """Target architectures of a CUDA build: ``TORCH_CUDA_ARCH_LIST`` or the visible GPUs."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        return env
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    return ""


def _cuda_library_dirs() -> list[str]:
    """Directories with ``libcudart.so`` to link against, besides torch's guess of ``CUDA_HOME`` (which is wrong
    when ``nvcc`` on the PATH is a wrapper script outside the tool kit, e.g. /usr/local/bin/nvcc)."""
    from torch.utils import cpp_extension

    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME, "/usr/local/cuda"]
    dirs = []
    for root in filter(None, roots):
        for sub in ("lib64", "lib", "lib/x64"):
            candidate = Path(root, sub)
            if (candidate / "libcudart.so").exists() or (candidate / "cudart.lib").exists():
                if str(candidate) not in dirs:
                    dirs.append(str(candidate))
    return dirs


def _build_config(device_type: str) -> dict:
    cflags, ldflags = _cpu_flags()
    config: dict = {"extra_cflags": cflags, "extra_ldflags": ldflags}
    if device_type == "cuda":
        config["extra_cflags"] = ["/O2"] if _is_msvc() else ["-O3"]
        config["extra_ldflags"] = [f"-L{d}" for d in _cuda_library_dirs()] if not _is_msvc() else []
        config["extra_cuda_cflags"] = ["-O3", "--expt-relaxed-constexpr"]
        config["arch_list"] = cuda_arch_list()
    return config


def build_key(device_type: str, sources: Path | None = None) -> str:
    """Name of the build directory: device, torch and Python version, hash of sources and flags."""
    sources = sources or source_dir()
    if sources is None:
        raise KernelBuildError("the kernel sources are not installed")
    digest = hashlib.sha256()
    for name in _SOURCES[device_type] + _HEADERS[device_type]:
        digest.update(name.encode())
        digest.update((sources / name).read_bytes())
    digest.update(repr(sorted(_build_config(device_type).items())).encode())
    digest.update(f"{torch.__version__}|{torch.version.cuda}|{sys.version_info[:2]}|{platform.machine()}".encode())
    digest.update(repr(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", None)).encode())
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    version = torch.__version__.replace("+", "_")
    return f"{device_type}-torch{version}-{tag}-{digest.hexdigest()[:16]}"


def build_directory(device_type: str) -> Path:
    return cache_root() / build_key(device_type)


def _module_name(device_type: str, key: str) -> str:
    return f"hf_dino_msda_{device_type}_{key.rsplit('-', 1)[-1]}"


def _library_path(build_dir: Path, name: str) -> Path:
    suffix = ".pyd" if _is_msvc() else ".so"
    return build_dir / f"{name}{suffix}"


def _import_built(name: str, path: Path) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise KernelBuildError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def check_toolchain(device_type: str) -> None:
    """Raise :class:`KernelBuildError` with a readable reason when the tools for a build are missing."""
    from torch.utils import cpp_extension

    if device_type not in DEVICE_TYPES:
        raise KernelBuildError(f"no kernel for device type {device_type!r}")
    compiler = os.environ.get("CXX", "cl" if _is_msvc() else "c++")
    if shutil.which(compiler) is None:
        raise KernelBuildError(f"no C++ compiler ({compiler!r} not found; set CXX)")
    if not cpp_extension.is_ninja_available():
        raise KernelBuildError("ninja is not installed (pip install ninja)")
    if device_type == "cuda":
        if torch.version.cuda is None:
            raise KernelBuildError("this torch build has no CUDA support")
        cuda_home = cpp_extension.CUDA_HOME
        nvcc = Path(cuda_home, "bin", "nvcc") if cuda_home else None
        if nvcc is None or not (nvcc.exists() or nvcc.with_suffix(".exe").exists()):
            raise KernelBuildError("nvcc not found (install the CUDA toolkit or set CUDA_HOME)")
        if not cuda_arch_list():
            raise KernelBuildError("no GPU visible and TORCH_CUDA_ARCH_LIST not set: unknown target architecture")


def build(device_type: str, *, verbose: bool | None = None) -> ModuleType:
    """Build (or load the cached build of) the extension for ``device_type``; raises on failure."""
    from torch.utils import cpp_extension

    if verbose is None:
        verbose = os.environ.get(ENV_VERBOSE, "") == "1"
    sources = source_dir()
    if sources is None:
        raise KernelBuildError("the kernel sources are not installed (only the Python files are present)")
    key = build_key(device_type, sources)
    build_dir = cache_root() / key
    name = _module_name(device_type, key)
    library = _library_path(build_dir, name)
    marker = build_dir / "BUILD_OK"
    if marker.is_file() and library.is_file():  # built before (maybe by another process): no tools needed
        return _import_built(name, library)
    check_toolchain(device_type)
    from filelock import FileLock  # a dependency of torch

    build_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(build_dir) + ".lock"):
        if marker.is_file() and library.is_file():
            return _import_built(name, library)
        config = _build_config(device_type)
        arch_list = config.pop("arch_list", None)
        previous_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if arch_list:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        try:
            module = cpp_extension.load(
                name=name,
                sources=[str(sources / f) for f in _SOURCES[device_type]],
                build_directory=str(build_dir),
                verbose=verbose,
                with_cuda=device_type == "cuda",
                **config,
            )
        except Exception as error:  # compiler or linker error: report the tail of the log
            raise KernelBuildError(f"compilation failed: {str(error).strip()[-2000:]}") from error
        finally:
            if arch_list:
                if previous_arch is None:
                    os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
                else:
                    os.environ["TORCH_CUDA_ARCH_LIST"] = previous_arch
        marker.write_text(f"{name}\n{torch.__version__}\n")
    sys.modules[name] = module
    return module


def load_extension(device_type: str) -> ModuleType | None:
    """The compiled extension for ``device_type``, building it on first use; None (after one warning) if impossible."""
    if device_type in _modules:
        return _modules[device_type]
    with _lock:
        if device_type in _modules:
            return _modules[device_type]
        try:
            module = build(device_type)
        except Exception as error:  # KernelBuildError, OSError, ImportError, ...
            _errors[device_type] = str(error)
            warnings.warn(
                f"hf_dino: could not build the {device_type} multi-scale deformable attention kernel "
                f"({error}); falling back to the slower pure-PyTorch implementation. "
                f"Set {ENV_DISABLE}=1 to use it without trying to compile.",
                RuntimeWarning,
                stacklevel=3,
            )
            module = None
        _modules[device_type] = module
        return module


def build_state(device_type: str) -> bool | None:
    """True: built and loaded in this process; False: the build failed; None: not attempted yet."""
    if device_type not in _modules:
        return None
    return _modules[device_type] is not None


def build_error(device_type: str) -> str | None:
    return _errors.get(device_type)


def _reset(device_type: str | None = None) -> None:
    """Forget build results of this process (tests)."""
    with _lock:
        for key in [device_type] if device_type else list(_modules):
            _modules.pop(key, None)
            _errors.pop(key, None)
