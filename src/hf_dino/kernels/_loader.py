"""Lazy, cached, process-safe compilation of the multi-scale deformable attention extensions.

Nothing is compiled at import. :func:`load_extension` builds (or loads a previous build of) the extension for
one device type the first time it is asked for it, with :func:`torch.utils.cpp_extension.load`:

* sources: ``hf_dino/kernels/csrc`` inside the installed package (wheel), or the repository's top-level
  ``kernels/`` directory in a source checkout; ``HF_DINO_KERNELS_SOURCES`` overrides both;
* build directory: ``<cache>/<device>-torch<version>-cp<python>-<hash>`` where the hash covers the sources,
  the compiler flags and (CUDA) the target architectures, and ``<cache>`` is ``HF_DINO_KERNELS_CACHE`` or
  ``~/.cache/hf_dino/kernels`` (``$XDG_CACHE_HOME`` honoured);
* a file lock next to the build directory, so parallel processes (accelerate, pytest-xdist, several ranks on
  one node) build once and the others load the result; a ``BUILD_OK`` marker recording the size and SHA-256 of
  the library is written only after a successful build, so a build killed half-way is redone;
* a cached library is verified against its marker before it is loaded (a truncated ``.so`` would kill the
  process with ``Bus error``); a corrupt one is deleted and rebuilt, and where it cannot be rebuilt the fallback
  warning says so. A build whose marker predates the size/hash record is loaded once in a child process and
  its marker upgraded;
* when the build is impossible (sources missing, no C++ compiler, no ninja, no nvcc / CUDA torch, compiler
  error) one warning is emitted per device type and process and ``None`` is returned: callers then use the
  pure-PyTorch implementation.

``HF_DINO_DISABLE_CUSTOM_KERNELS=1`` disables all of it (checked by the callers, see :func:`kernels_disabled`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import warnings
from typing import Callable
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
    "cpu": ("msda_common.h", "msda_cpu_kernel.h", "attention_cpu_kernel.h", "layer_norm_cpu_kernel.h"),
    "cuda": ("msda_common.h",),
}

_lock = threading.Lock()
_modules: dict[str, ModuleType | None] = {}  # device type -> module, or None once a build failed
_errors: dict[str, str] = {}


class KernelBuildError(RuntimeError):
    """The extension cannot be built here (missing tool chain, sources, compile error)."""


def _cpp_extension():
    """``torch.utils.cpp_extension``, imported without the "No CUDA runtime is found" warning it logs on machines
    with a CUDA tool kit but no GPU (it concerns CUDA builds only, and the CPU kernel is what runs there)."""
    if "torch.utils.cpp_extension" not in sys.modules and not torch.cuda.is_available():
        cpp_logger = logging.getLogger("torch.utils.cpp_extension")

        def no_cuda_runtime_filter(record: logging.LogRecord) -> bool:
            return "No CUDA runtime is found" not in record.getMessage()

        cpp_logger.addFilter(no_cuda_runtime_filter)
        try:
            from torch.utils import cpp_extension
        finally:
            cpp_logger.removeFilter(no_cuda_runtime_filter)
    from torch.utils import cpp_extension

    return cpp_extension


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
    cpp_extension = _cpp_extension()

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


# ----------------------------------------------------------------------------------------------------------------------
# Verification of a cached build
# ----------------------------------------------------------------------------------------------------------------------

MARKER = "BUILD_OK"


def _file_digest(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return path.stat().st_size, digest.hexdigest()


def _write_marker(build_dir: Path, name: str, library: Path) -> None:
    size, sha256 = _file_digest(library)
    record = {"module": name, "library": library.name, "size": size, "sha256": sha256, "torch": torch.__version__}
    tmp = build_dir / f".{MARKER}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, build_dir / MARKER)


def _loads_in_child(name: str, library: Path) -> str | None:
    """Import ``library`` in a separate Python process (a truncated library kills the process that maps it);
    ``None`` when it loads, else why not."""
    code = (
        "import importlib.util, sys, torch\n"
        f"spec = importlib.util.spec_from_file_location({name!r}, {str(library)!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
    )
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as error:
        return f"it could not be test-loaded ({error})"
    if result.returncode == 0:
        return None
    if result.returncode < 0:
        return f"loading it kills the process (signal {-result.returncode})"
    return "it does not load: " + (result.stderr.strip().splitlines() or ["?"])[-1]


def check_build(device_type: str, build_dir: Path | None = None) -> tuple[str, str]:
    """State of the cached build for ``device_type``: ``("missing", why)``, ``("ok", details)`` or
    ``("corrupt", what is wrong)``. Never imports the library into this process."""
    if build_dir is None:
        build_dir = build_directory(device_type)
    name = _module_name(device_type, build_dir.name)
    library = _library_path(build_dir, name)
    marker = build_dir / MARKER
    if not marker.is_file():
        return "missing", "not built"
    if not library.is_file():
        return "corrupt", f"{library} is missing although {marker} says it was built"
    try:
        record = json.loads(marker.read_text())
    except ValueError:
        record = None
    if not isinstance(record, dict) or "sha256" not in record:  # a marker written before sizes/hashes were recorded
        problem = _loads_in_child(name, library)
        if problem is not None:
            return "corrupt", f"{library} is corrupt: {problem}"
        _write_marker(build_dir, name, library)
        record = json.loads(marker.read_text())
    size, sha256 = _file_digest(library)
    if size != record.get("size"):
        return "corrupt", (f"{library} is corrupt: {size} bytes where the build wrote {record.get('size')} "
                           "(truncated or overwritten)")
    if sha256 != record.get("sha256"):
        return "corrupt", f"{library} is corrupt: its SHA-256 differs from the one recorded at build time"
    return "ok", f"{size} bytes, sha256 {sha256[:12]}, verified"


def _discard(build_dir: Path, name: str) -> None:
    """Delete a corrupt library and its marker (the object files stay: ninja relinks; see :func:`build`)."""
    for path in (build_dir / MARKER, _library_path(build_dir, name)):
        path.unlink(missing_ok=True)


def check_toolchain(device_type: str) -> None:
    """Raise :class:`KernelBuildError` with a readable reason when the tools for a build are missing."""
    cpp_extension = _cpp_extension()

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


def build(device_type: str, *, verbose: bool | None = None, log: Callable[[str], None] | None = None) -> ModuleType:
    """Build (or load the verified cached build of) the extension for ``device_type``; raises on failure.

    A cached library that fails verification (:func:`check_build`) is deleted and rebuilt. ``log`` receives one
    line per stage (checking, compiling, done), e.g. ``print`` for a command line.
    """
    if verbose is None:
        verbose = os.environ.get(ENV_VERBOSE, "") == "1"
    say = log or (lambda message: None)
    sources = source_dir()
    if sources is None:
        raise KernelBuildError("the kernel sources are not installed (only the Python files are present)")
    key = build_key(device_type, sources)
    build_dir = cache_root() / key
    name = _module_name(device_type, key)
    library = _library_path(build_dir, name)
    if name in sys.modules:  # loaded (so verified) earlier in this process
        return sys.modules[name]
    state, details = check_build(device_type, build_dir)
    if state == "ok":  # built before (maybe by another process): no tools needed
        say(f"{device_type}: cached build {build_dir} ({details})")
        return _import_built(name, library)
    if state == "corrupt":
        say(f"{device_type}: {details}; rebuilding")
    try:
        check_toolchain(device_type)
    except KernelBuildError as error:
        if state == "corrupt":
            raise KernelBuildError(f"{details}, and it cannot be rebuilt here: {error}") from error
        raise
    from filelock import FileLock  # a dependency of torch

    build_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(build_dir) + ".lock"):
        state, details = check_build(device_type, build_dir)  # another process may have built or repaired it
        if state == "ok":
            return _import_built(name, library)
        if state == "corrupt":
            _discard(build_dir, name)
        say(f"{device_type}: compiling into {build_dir} (about a minute; {ENV_VERBOSE}=1 or --verbose shows the "
            "compiler output)")
        start = time.perf_counter()
        try:
            module = _compile(device_type, name, sources, build_dir, verbose)
        except KernelBuildError:
            if state != "corrupt":
                raise
            # the object files may be damaged as well: rebuild from an empty folder
            say(f"{device_type}: relinking failed; rebuilding {build_dir} from scratch")
            shutil.rmtree(build_dir, ignore_errors=True)
            build_dir.mkdir(parents=True, exist_ok=True)
            module = _compile(device_type, name, sources, build_dir, verbose)
        _write_marker(build_dir, name, library)
        say(f"{device_type}: compiled in {time.perf_counter() - start:.0f} s")
    sys.modules[name] = module
    return module


def _compile(device_type: str, name: str, sources: Path, build_dir: Path, verbose: bool) -> ModuleType:
    cpp_extension = _cpp_extension()
    config = _build_config(device_type)
    arch_list = config.pop("arch_list", None)
    previous_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch_list:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    try:
        return cpp_extension.load(
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
            fix = f"Set {ENV_DISABLE}=1 to use it without trying to compile."
            if "is corrupt" in str(error):
                fix = (f"To fix it, delete {_safe_build_directory(device_type)} and run `python -m hf_dino.kernels "
                       f"build` where a C++ compiler is available, or point {ENV_CACHE} to another folder; "
                       f"or set {ENV_DISABLE}=1.")
            warnings.warn(
                f"hf_dino: could not build the {device_type} multi-scale deformable attention kernel "
                f"({error}); falling back to the slower pure-PyTorch implementation. {fix}",
                RuntimeWarning,
                stacklevel=3,
            )
            module = None
        _modules[device_type] = module
        return module


def _safe_build_directory(device_type: str) -> str:
    try:
        return str(build_directory(device_type))
    except KernelBuildError:
        return f"the {device_type} build under {cache_root()}"


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
