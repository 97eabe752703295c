"""Does the installed torch fit the NVIDIA driver? The rule, the table, and the one-line answers.

NVML reports the driver's highest supported CUDA version (``GpuInfo.cuda_version``, e.g.
``"12.4"``); torch reports the CUDA version its wheel was built for (``torch.version.cuda``,
``None`` for a CPU build). Whether that build runs on that driver follows NVIDIA's rules
(CUDA Compatibility guide, "Minor Version Compatibility"; CUDA Toolkit release notes, the
toolkit/driver table):

* **Backward compatibility**: a driver runs anything built for its CUDA version or an older
  one, whatever the major version (an R580 driver, CUDA 13.0, runs a ``cu126`` build).
* **Minor-version compatibility** (CUDA 11 and later): within one major version, a build for a
  newer minor runs on an older driver of the same major (a ``cu126`` build on an R550 driver,
  CUDA 12.4), with a limited feature set: code the driver would have to JIT-compile from
  newer PTX fails (``cudaErrorUnsupportedPtxVersion``). It needs the major's minimum driver:
  R525 for 12.x, R580 for 13.x, which a driver reporting that major has.
* A build for a **newer major** than the driver supports does not run (a ``cu130`` build on an
  R550 driver: torch reports no CUDA device, "driver too old").

:data:`DRIVER_TABLE` lists driver branches with the CUDA version each supports and the
PyTorch CUDA build (``cuXYZ``, an index under https://download.pytorch.org/whl/) to install for
it: the newest *stable* build of :data:`TESTED_TORCH` whose CUDA version the branch supports,
else (branches older than every build) the oldest build of the same major, through
minor-version compatibility. The table in ``docs/install.md`` is :func:`driver_table_markdown`
and a test holds the two equal.

Nothing here imports torch at module import; :func:`torch_build` is the one function that does.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

__all__ = [
    "DRIVER_TABLE",
    "TESTED_TORCH",
    "TORCH_CUDA_BUILDS",
    "DriverRow",
    "TorchBuild",
    "cuda_unusable_error",
    "driver_row",
    "driver_supports",
    "driver_table_markdown",
    "fit_line",
    "index_url",
    "install_command",
    "installed_torch_version",
    "torch_build",
    "rule_build",
    "torch_index_for",
    "torch_message_line",
]

TORCH_INDEX = "https://download.pytorch.org/whl"

# The torch version the project tests with (and the CUDA image pins).
TESTED_TORCH = "2.13.0"

# PyTorch 2.13's stable CUDA builds (its release compatibility matrix: CUDA 12.6 and 13.0;
# CUDA 13.2, ``cu132``, is experimental and not recommended here). Build tag -> CUDA version.
TORCH_CUDA_BUILDS: dict[str, str] = {"cu126": "12.6", "cu130": "13.0"}


@dataclass(frozen=True)
class DriverRow:
    """One NVIDIA driver branch: the first driver of the branch (Linux x86_64, from the CUDA
    toolkit release notes), the highest CUDA version the branch supports (what ``nvidia-smi``
    and NVML report), and the PyTorch build to install for it (``None``: no CUDA build of
    :data:`TESTED_TORCH` runs on it; upgrade the driver)."""

    branch: str
    min_driver: str
    cuda: str
    torch: str | None


DRIVER_TABLE: tuple[DriverRow, ...] = (
    DriverRow("R470", "470.42.01", "11.4", None),
    DriverRow("R520", "520.61.05", "11.8", None),
    DriverRow("R525", "525.60.13", "12.0", "cu126"),
    DriverRow("R530", "530.30.02", "12.1", "cu126"),
    DriverRow("R535", "535.54.03", "12.2", "cu126"),
    DriverRow("R545", "545.23.06", "12.3", "cu126"),
    DriverRow("R550", "550.54.14", "12.4", "cu126"),
    DriverRow("R555", "555.42.02", "12.5", "cu126"),
    DriverRow("R560", "560.28.03", "12.6", "cu126"),
    DriverRow("R570", "570.26", "12.8", "cu126"),
    DriverRow("R575", "575.51.03", "12.9", "cu126"),
    DriverRow("R580", "580.65.06", "13.0", "cu130"),
    DriverRow("R590", "590.44.01", "13.1", "cu130"),
    DriverRow("R595", "595.45.04", "13.2", "cu130"),
)

# What to say instead of a command when no CUDA build fits this driver.
CPU_HINT = 'or set device = "cpu" on the model / gpus.enabled = false for CPU mode'


@dataclass(frozen=True)
class TorchBuild:
    """What the installed torch is and whether it can use CUDA here.

    ``version`` None: torch is not installed. ``cuda`` None: a CPU build (``torch.version.cuda``).
    ``error``: why CUDA is unusable, in one line, when torch says (its "CUDA initialization"
    warning, or the exception it raised); never a traceback.
    """

    version: str | None
    cuda: str | None
    cuda_available: bool
    device_count: int
    error: str | None


# -- versions --------------------------------------------------------------------------------


def _parse(version: str | None) -> tuple[int, int] | None:
    """``"12.4"`` (or ``"12.4.1"``, ``"12"``) -> ``(12, 4)``; None for anything else."""
    if not version:
        return None
    match = re.fullmatch(r"\s*(\d+)(?:\.(\d+))?(?:\.\d+)*\s*", str(version))
    if match is None:
        return None
    return int(match[1]), int(match[2] or 0)


def _build_cuda(tag: str) -> str:
    """``"cu126"`` -> ``"12.6"`` (the last digit is the minor version)."""
    digits = tag.removeprefix("cu")
    return f"{int(digits[:-1])}.{int(digits[-1])}"


def driver_supports(torch_cuda: str | None, driver_cuda: str | None) -> bool | None:
    """Does a torch built for CUDA ``torch_cuda`` run on a driver supporting CUDA ``driver_cuda``?

    True when the build's CUDA version is the driver's or older (backward compatibility), or
    newer only in the minor version, CUDA 11 onwards (minor-version compatibility; see the
    module docstring for its limits). False for a newer major version, or a newer minor before
    CUDA 11. None when either version is unknown (a CPU build, no driver, unparseable).
    """
    build, driver = _parse(torch_cuda), _parse(driver_cuda)
    if build is None or driver is None:
        return None
    if build <= driver:
        return True
    return build[0] == driver[0] and build[0] >= 11


def _minor_compat_only(torch_cuda: str | None, driver_cuda: str | None) -> bool:
    """True when the build runs on this driver only through minor-version compatibility."""
    build, driver = _parse(torch_cuda), _parse(driver_cuda)
    if build is None or driver is None or build <= driver:
        return False
    return driver_supports(torch_cuda, driver_cuda) is True


def driver_row(driver_cuda: str | None) -> DriverRow | None:
    """The :data:`DRIVER_TABLE` row for a driver reporting CUDA ``driver_cuda``: the newest row
    whose CUDA version it supports (12.7, the R565 branch, falls to the 12.6 row; 13.5 to the
    newest). None when unknown or older than every row."""
    driver = _parse(driver_cuda)
    if driver is None:
        return None
    rows = [row for row in DRIVER_TABLE if (_parse(row.cuda) or (0, 0)) <= driver]
    return rows[-1] if rows else None


def index_url(tag: str) -> str:
    """``"cu126"`` -> ``https://download.pytorch.org/whl/cu126``."""
    return f"{TORCH_INDEX}/{tag}"


def torch_index_for(driver_cuda: str | None) -> tuple[str, str]:
    """``(build tag, index URL)`` of the PyTorch build to install for a driver reporting CUDA
    ``driver_cuda``, from :data:`DRIVER_TABLE`: e.g. ``("cu126", "https://download.pytorch.org/whl/cu126")``
    for CUDA 12.4. ``("cpu", .../whl/cpu)`` when there is no driver (``None``) or no CUDA build
    runs on it (older than R525): then only the CPU build is usable without a driver upgrade.
    """
    row = driver_row(driver_cuda)
    tag = row.torch if row is not None and row.torch is not None else "cpu"
    return tag, index_url(tag)


def install_command(tag: str, replace: bool = True) -> str:
    """The pip command installing torch's ``tag`` build; ``replace`` uninstalls the torch there
    first (pip keeps an installed torch that satisfies ``torch`` whatever its build)."""
    install = f"pip install --index-url {index_url(tag)} torch"
    return f"pip uninstall -y torch && {install}" if replace else install


def installed_torch_version() -> str | None:
    """The installed torch distribution's version (``"2.13.0+cpu"``), without importing torch."""
    from importlib import metadata

    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


# -- asking torch ----------------------------------------------------------------------------


def torch_message_line(text: str, limit: int = 240) -> str:
    """A message from torch (a warning, an exception) as one short line: whitespace collapsed,
    torch's source location and its download-page advice dropped (the miner's own line says
    what to install), at most ``limit`` characters."""
    text = re.sub(r"\s+", " ", str(text)).strip()
    text = re.sub(r"\s*\(Triggered internally at [^)]*\)\s*", " ", text).strip()
    text = text.removeprefix("CUDA initialization:").strip()
    for cut in (" Please update your GPU driver", " Alternatively, go to"):
        text = text.split(cut, 1)[0].strip()
    text = text.rstrip(".").strip()
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def torch_build() -> TorchBuild:
    """Import torch and ask it about CUDA; never raises.

    Calls only ``torch.cuda.is_available()`` and ``torch.cuda.device_count()``: they initialise
    the CUDA driver to count devices, but create no CUDA context and do not run torch's lazy
    CUDA initialisation. The warning torch emits when CUDA cannot start ("The NVIDIA driver on
    your system is too old ...") is caught and becomes ``error``.
    """
    version = installed_torch_version()
    try:
        import torch
    except Exception as exc:  # a broken install must not stop probe or the error line
        why = torch_message_line(f"import torch failed: {type(exc).__name__}: {exc}")
        return TorchBuild(version, None, False, 0, why)
    version = str(getattr(torch, "__version__", version))
    cuda = getattr(getattr(torch, "version", None), "cuda", None)
    error: str | None = None
    available, count = False, 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            available = bool(torch.cuda.is_available())
            count = int(torch.cuda.device_count()) if cuda is not None else 0
        except Exception as exc:  # torch raises RuntimeError and friends from C++
            error = torch_message_line(f"{type(exc).__name__}: {exc}")
    if error is None:
        said = [str(w.message) for w in caught if "cuda" in str(w.message).lower()]
        if said and not available:
            error = torch_message_line(said[0])
    return TorchBuild(version, str(cuda) if cuda is not None else None, available, count, error)


# -- the lines -------------------------------------------------------------------------------


def _describe_torch(build: TorchBuild) -> str:
    if build.version is None:
        return "torch (not installed)"
    if build.cuda is None:
        return f"torch {build.version} (CPU build)"
    return f"torch {build.version} (CUDA {build.cuda} build)"


def _describe_driver(driver_version: str | None, driver_cuda: str | None) -> str:
    cuda = f"CUDA <= {driver_cuda}" if driver_cuda else "CUDA version unknown"
    return f"driver {driver_version or 'unknown'}, {cuda}"


def _needed_branch(torch_cuda: str) -> str:
    """The oldest driver branch that runs a build for ``torch_cuda`` (e.g. "R580 (580.65.06)")."""
    for row in DRIVER_TABLE:
        if driver_supports(torch_cuda, row.cuda):
            return f"{row.branch} ({row.min_driver} or newer)"
    return f"one for CUDA {torch_cuda}"


def _fix(driver_cuda: str | None, replace: bool) -> str:
    """What to install (or upgrade) for this driver, as one clause."""
    tag, _ = torch_index_for(driver_cuda)
    if tag == "cpu":
        if driver_cuda is None:
            return "install the torch build for the driver's CUDA version (the table in docs/install.md)"
        oldest = min((row for row in DRIVER_TABLE if row.torch), key=lambda row: _parse(row.cuda) or (0, 0))
        return (
            f"no torch {TESTED_TORCH} CUDA build runs on a driver for CUDA {driver_cuda}; upgrade the NVIDIA driver "
            f"to {oldest.branch} or newer"
        )
    compat = _minor_compat_only(_build_cuda(tag), driver_cuda)
    note = " (runs through CUDA minor-version compatibility)" if compat else ""
    return f"install the {tag} build{note}: {install_command(tag, replace)}"


def fit_line(build: TorchBuild, driver_version: str | None, driver_cuda: str | None) -> tuple[bool | None, str]:
    """``(fits, line)`` for ``probe``: torch's version and CUDA build beside the driver's maximum
    CUDA version, and whether they fit, e.g. ``"torch 2.13.0+cpu (CPU build) with driver
    580.65.06 (CUDA <= 13.0): does not fit; install the cu130 build: pip uninstall -y torch &&
    pip install --index-url https://download.pytorch.org/whl/cu130 torch"``.

    ``fits`` is None when there is nothing to judge (torch not installed, or no driver), True
    when the transformers runner can use the GPUs, False when it would stop at start.
    """
    torch_text = _describe_torch(build)
    if driver_version is None and driver_cuda is None:
        if build.version is None:
            return None, "torch: not installed (no NVIDIA driver either: the transformers runner would run on the CPU)"
        return None, f"{torch_text}, no NVIDIA driver: models run on the CPU"
    cuda = f"CUDA <= {driver_cuda}" if driver_cuda else "CUDA version unknown"
    head = f"{torch_text} with driver {driver_version or 'unknown'} ({cuda})"
    if build.version is None:
        tag, _ = torch_index_for(driver_cuda)
        if tag == "cpu":
            return None, f"{head}: {_fix(driver_cuda, replace=False)}"
        return None, f"{head}: for the transformers runner {_fix(driver_cuda, replace=False)}"
    if build.cuda is None:
        return False, f"{head}: does not fit (a CPU build cannot use the GPUs); {_fix(driver_cuda, replace=True)}"
    supported = driver_supports(build.cuda, driver_cuda)
    if supported is False:
        return False, (
            f"{head}: does not fit (a CUDA {build.cuda} build needs driver {_needed_branch(build.cuda)}); "
            f"{_fix(driver_cuda, replace=True)}, or upgrade the driver"
        )
    if not build.cuda_available or build.device_count == 0:
        why = build.error or "torch sees no CUDA device"
        fit = "the versions fit but " if supported else ""
        return False, (
            f"{head}: {fit}torch cannot use CUDA ({why}); check CUDA_VISIBLE_DEVICES and that "
            "/dev/nvidia* is reachable (Docker: --gpus all)"
        )
    seen = f"torch sees {build.device_count} GPU(s)"
    if supported is None:
        return None, f"{head}: {seen}; the driver's CUDA version is unknown, so the fit cannot be checked"
    if _minor_compat_only(build.cuda, driver_cuda):
        return True, (
            f"{head}: fits through CUDA minor-version compatibility ({seen}; kernels the driver must JIT-compile "
            f"from newer PTX fail; driver {_needed_branch_exact(build.cuda)} lifts that)"
        )
    return True, f"{head}: fits ({seen})"


def _needed_branch_exact(torch_cuda: str) -> str:
    """The oldest driver branch whose own CUDA version is at least ``torch_cuda``."""
    wanted = _parse(torch_cuda) or (0, 0)
    for row in DRIVER_TABLE:
        if (_parse(row.cuda) or (0, 0)) >= wanted:
            return f"{row.branch} ({row.min_driver} or newer)"
    return f"for CUDA {torch_cuda} or newer"


def cuda_unusable_error(build: TorchBuild, gpu_count: int, driver_version: str | None, driver_cuda: str | None) -> str:
    """The one-line start-up error when NVML sees GPUs but torch cannot use CUDA.

    Names torch's version and CUDA build, the driver's highest CUDA version and the fix, e.g.
    ``NVML sees 2 GPU(s) (driver 550.54.15, CUDA <= 12.4) but torch 2.13.0+cpu is a CPU build and
    cannot use them; install the cu126 build (...): pip uninstall -y torch && pip install
    --index-url https://download.pytorch.org/whl/cu126 torch (or set device = "cpu" on the model
    / gpus.enabled = false for CPU mode)``.
    """
    head = f"NVML sees {gpu_count} GPU(s) ({_describe_driver(driver_version, driver_cuda)}) but"
    if build.version is None:
        return f"{head} torch is not installed; {_fix(driver_cuda, replace=False)} ({CPU_HINT})"
    if build.cuda is None:
        fix = _fix(driver_cuda, replace=True)
        return f"{head} torch {build.version} is a CPU build and cannot use them; {fix} ({CPU_HINT})"
    said = f" (torch: {build.error})" if build.error else ""
    if driver_supports(build.cuda, driver_cuda) is False:
        return (
            f"{head} torch {build.version} is built for CUDA {build.cuda}, which needs driver "
            f"{_needed_branch(build.cuda)}{said}; {_fix(driver_cuda, replace=True)}, or upgrade the driver ({CPU_HINT})"
        )
    if driver_cuda is None:
        return (
            f"{head} torch {build.version} (CUDA {build.cuda} build) cannot use them{said}; compare the build with "
            f"the CUDA version nvidia-smi reports and install the matching one (docs/install.md) ({CPU_HINT})"
        )
    return (
        f"{head} torch {build.version} (CUDA {build.cuda} build, which this driver runs) cannot use them"
        f"{said or ' (torch sees no CUDA device)'}; check CUDA_VISIBLE_DEVICES and that /dev/nvidia* is reachable "
        f"(Docker: --gpus all) ({CPU_HINT})"
    )


# -- the docs table --------------------------------------------------------------------------


def driver_table_markdown() -> str:
    """The Markdown table of :data:`DRIVER_TABLE` that ``docs/install.md`` carries verbatim."""
    lines = [
        "| driver branch | first driver | max CUDA | torch build | install torch from |",
        "|---|---|---|---|---|",
    ]
    for row in reversed(DRIVER_TABLE):
        if row.torch is None:
            build, source = "none", "upgrade the driver (or the CPU build: `https://download.pytorch.org/whl/cpu`)"
        else:
            compat = " (minor-version compatibility)" if _minor_compat_only(_build_cuda(row.torch), row.cuda) else ""
            build, source = f"`{row.torch}`{compat}", f"`{index_url(row.torch)}`"
        lines.append(f"| {row.branch} | {row.min_driver} | {row.cuda} | {build} | {source} |")
    return "\n".join(lines)


def rule_build(driver_cuda: str) -> str | None:
    """The build the rule picks for a driver reporting CUDA ``driver_cuda``, from
    :data:`TORCH_CUDA_BUILDS` alone: the newest build whose CUDA version the driver reports or
    exceeds, else the oldest it runs through minor-version compatibility, else None. Each
    :data:`DRIVER_TABLE` row holds this value (a test checks it)."""
    driver = _parse(driver_cuda) or (0, 0)
    by_cuda = sorted(TORCH_CUDA_BUILDS, key=lambda tag: _parse(TORCH_CUDA_BUILDS[tag]) or (0, 0))
    fitting = [tag for tag in by_cuda if (_parse(TORCH_CUDA_BUILDS[tag]) or (0, 0)) <= driver]
    if fitting:
        return fitting[-1]
    compatible = [tag for tag in by_cuda if driver_supports(TORCH_CUDA_BUILDS[tag], driver_cuda)]
    return compatible[0] if compatible else None
