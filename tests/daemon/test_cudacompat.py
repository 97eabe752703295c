"""torch's CUDA build against the driver: the fit rule, the index to install from, the lines probe and start-up print."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from miner.cli.probe import gather, render_text
from miner.host.cudacompat import (
    DRIVER_TABLE,
    TESTED_TORCH,
    TORCH_CUDA_BUILDS,
    TorchBuild,
    cuda_unusable_error,
    driver_row,
    driver_supports,
    driver_table_markdown,
    fit_line,
    installed_torch_version,
    rule_build,
    torch_build,
    torch_index_for,
    torch_message_line,
)
from miner.host.fakenvml import FakeGpu, FakeNvml, h200s

ROOT = Path(__file__).resolve().parents[2]
INSTALL_MD = ROOT / "docs" / "install.md"

CPU_TORCH = TorchBuild("2.13.0+cpu", None, False, 0, None)
PYPI_CU130 = TorchBuild("2.14.0", "13.0", False, 0, "The NVIDIA driver on your system is too old (found version 12040)")
CU126_OK = TorchBuild("2.13.0+cu126", "12.6", True, 2, None)
NO_TORCH = TorchBuild(None, None, False, 0, None)


@pytest.mark.parametrize(
    ("torch_cuda", "driver_cuda", "expected"),
    [
        ("12.6", "12.6", True),  # the build's own CUDA version
        ("12.6", "13.0", True),  # backward compatibility across majors: R580 runs cu126
        ("12.6", "12.9", True),
        ("11.8", "12.4", True),
        ("12.6", "12.4", True),  # minor-version compatibility: cu126 on R550
        ("12.8", "12.0", True),
        ("13.2", "13.0", True),  # cu132 on R580
        ("13.0", "12.4", False),  # a newer major: PyPI's cu130 torch on R550
        ("13.0", "12.9", False),
        ("12.6", "11.8", False),
        ("10.2", "10.1", False),  # minor-version compatibility starts with CUDA 11
        ("11.8", "11.4", True),
        (None, "12.4", None),  # a CPU build: nothing to compare
        ("12.6", None, None),  # no driver
        ("twelve", "12.4", None),
        ("12.6.3", "12.6", True),  # patch levels are ignored
    ],
)
def test_fit_rule(torch_cuda: str | None, driver_cuda: str | None, expected: bool | None) -> None:
    """driver_supports follows NVIDIA's backward and minor-version compatibility on real version pairs."""
    assert driver_supports(torch_cuda, driver_cuda) is expected


@pytest.mark.parametrize(
    ("driver_cuda", "tag"),
    [
        ("12.4", "cu126"),  # R550: no stable build at or below 12.4, cu126 through minor-version compatibility
        ("12.0", "cu126"),
        ("12.6", "cu126"),
        ("12.7", "cu126"),  # R565 has no row of its own: R560's
        ("12.9", "cu126"),
        ("13.0", "cu130"),
        ("13.2", "cu130"),  # cu132 is experimental in torch 2.13
        ("14.1", "cu130"),  # a driver newer than the table still runs the newest build
        ("11.8", "cpu"),  # no torch 2.13 CUDA build runs on a CUDA 11 driver
        ("11.4", "cpu"),
        (None, "cpu"),
        ("", "cpu"),
    ],
)
def test_index_choice(driver_cuda: str | None, tag: str) -> None:
    """torch_index_for names the newest stable build the driver runs, with PyTorch's index URL."""
    assert torch_index_for(driver_cuda) == (tag, f"https://download.pytorch.org/whl/{tag}")
    if tag != "cpu":
        assert driver_supports(TORCH_CUDA_BUILDS[tag], driver_cuda) is True


def test_driver_table_is_consistent() -> None:
    """DRIVER_TABLE rows run oldest to newest, name their branch by driver, and hold the build the rule picks."""
    cudas = [tuple(int(p) for p in row.cuda.split(".")) for row in DRIVER_TABLE]
    assert cudas == sorted(cudas) and len(set(cudas)) == len(cudas)
    for row in DRIVER_TABLE:
        assert row.min_driver.startswith(row.branch.removeprefix("R") + "."), row
        assert row.torch is None or row.torch in TORCH_CUDA_BUILDS, row
        assert row.torch == rule_build(row.cuda), row
        assert driver_row(row.cuda) == row
    assert {row.torch for row in DRIVER_TABLE} - {None} == set(TORCH_CUDA_BUILDS), "every stable build has a row"
    # NVIDIA's minimum drivers for a CUDA major's minor-version compatibility: R525 for 12.x, R580 for 13.x.
    first = {major: next(r for r in DRIVER_TABLE if r.cuda.startswith(f"{major}.")) for major in (12, 13)}
    assert (first[12].branch, first[12].min_driver) == ("R525", "525.60.13")
    assert (first[13].branch, first[13].min_driver) == ("R580", "580.65.06")


def test_docs_table_matches_driver_table() -> None:
    """docs/install.md carries driver_table_markdown() verbatim between its markers."""
    text = INSTALL_MD.read_text(encoding="utf-8")
    assert "## Torch, CUDA and the driver" in text
    match = re.search(r"<!-- driver-table:[^>]*-->\n(.*?)\n<!-- /driver-table -->", text, re.S)
    assert match, "the table markers are missing from docs/install.md"
    assert match[1] == driver_table_markdown()
    for row in DRIVER_TABLE:
        assert f"| {row.branch} | {row.min_driver} | {row.cuda} |" in match[1]


def test_docs_quote_the_lines_the_code_prints() -> None:
    """The probe line and the start-up error quoted in docs/install.md are what the code writes, word for word."""
    text = INSTALL_MD.read_text(encoding="utf-8")
    assert fit_line(CPU_TORCH, "550.54.15", "12.4")[1] in text
    assert cuda_unusable_error(PYPI_CU130, 2, "550.54.15", "12.4") in text


def test_install_commands_do_not_pull_pypi_torch_first() -> None:
    """Every `[transformers]` install in docs/install.md comes after a torch install from PyTorch's index."""
    text = INSTALL_MD.read_text(encoding="utf-8")
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        lines = block.splitlines()
        for i, line in enumerate(lines):
            if "[transformers]" in line and "pip install" in line:
                before = "\n".join(lines[:i])
                assert "--index-url https://download.pytorch.org/whl/" in before, line


def _assert_one_error_line(line: str, build: TorchBuild, driver_cuda: str, url: str) -> None:
    assert "\n" not in line and "Traceback" not in line
    assert f"CUDA <= {driver_cuda}" in line and url in line
    if build.version is not None:
        assert f"torch {build.version}" in line
    assert ("CPU build" in line) if build.cuda is None else (f"CUDA {build.cuda}" in line)


def test_error_line_for_a_cpu_build() -> None:
    """A CPU torch on a GPU host: one line with torch's version, "CPU build", the driver's CUDA and the index to use."""
    line = cuda_unusable_error(CPU_TORCH, 2, "550.54.15", "12.4")
    _assert_one_error_line(line, CPU_TORCH, "12.4", "https://download.pytorch.org/whl/cu126")
    assert line.startswith("NVML sees 2 GPU(s) (driver 550.54.15, CUDA <= 12.4) but torch 2.13.0+cpu is a CPU build")
    assert "pip uninstall -y torch && pip install --index-url https://download.pytorch.org/whl/cu126 torch" in line
    assert 'device = "cpu"' in line and "gpus.enabled = false" in line


def test_error_line_for_a_build_newer_than_the_driver() -> None:
    """PyPI's cu130 torch on an R550 driver: the needed driver, torch's own reason and the cu126 index."""
    line = cuda_unusable_error(PYPI_CU130, 4, "550.54.15", "12.4")
    _assert_one_error_line(line, PYPI_CU130, "12.4", "https://download.pytorch.org/whl/cu126")
    assert "needs driver R580 (580.65.06 or newer)" in line and "found version 12040" in line
    assert "upgrade the driver" in line


def test_error_line_when_no_build_fits_the_driver() -> None:
    """On a CUDA 11 driver no torch 2.13 CUDA build runs: the line says to upgrade the driver to R525+."""
    line = cuda_unusable_error(CPU_TORCH, 1, "470.42.01", "11.4")
    assert "\n" not in line and "CUDA <= 11.4" in line and "upgrade the NVIDIA driver to R525" in line
    assert TESTED_TORCH in line


def test_error_line_when_versions_fit_but_cuda_is_unusable() -> None:
    """A cu126 torch on R580 that sees no device points at device visibility, not at the build."""
    build = TorchBuild("2.13.0+cu126", "12.6", False, 0, None)
    line = cuda_unusable_error(build, 2, "580.65.06", "13.0")
    assert "\n" not in line and "torch 2.13.0+cu126" in line and "CUDA 12.6" in line and "CUDA <= 13.0" in line
    assert "CUDA_VISIBLE_DEVICES" in line and "--gpus all" in line and "--index-url" not in line


def test_error_line_without_torch() -> None:
    """torch missing altogether: the line names the index to install it from."""
    line = cuda_unusable_error(NO_TORCH, 1, "580.65.06", "13.0")
    assert (
        "torch is not installed" in line
        and "pip install --index-url https://download.pytorch.org/whl/cu130 torch" in line
    )
    assert "uninstall" not in line


@pytest.mark.parametrize(
    ("build", "driver", "cuda", "fits", "words"),
    [
        (
            CPU_TORCH,
            "580.65.06",
            "13.0",
            False,
            ["torch 2.13.0+cpu (CPU build) with driver 580.65.06 (CUDA <= 13.0): does not fit", "/whl/cu130"],
        ),
        (PYPI_CU130, "550.54.15", "12.4", False, ["(CUDA 13.0 build)", "R580", "/whl/cu126"]),
        (CU126_OK, "580.65.06", "13.0", True, ["fits (torch sees 2 GPU(s))"]),
        (CU126_OK, "550.54.15", "12.4", True, ["minor-version compatibility", "R560 (560.28.03 or newer)"]),
        (NO_TORCH, "550.54.15", "12.4", None, ["pip install --index-url https://download.pytorch.org/whl/cu126 torch"]),
        (CPU_TORCH, None, None, None, ["no NVIDIA driver", "CPU"]),
    ],
)
def test_fit_line(build: TorchBuild, driver: str | None, cuda: str | None, fits: bool | None, words: list[str]) -> None:
    """fit_line puts torch's version and build beside the driver's CUDA version and says whether they fit."""
    got_fits, line = fit_line(build, driver, cuda)
    assert got_fits is fits and "\n" not in line
    for word in words:
        assert word in line


def test_torch_messages_become_one_short_line() -> None:
    """torch's multi-line CUDA warning loses its source location and download advice."""
    raw = (
        "CUDA initialization: The NVIDIA driver on your system is too old (found version 12040). Please update your GPU\n"
        "driver by downloading and installing a new version from the URL: http://www.nvidia.com/Download/index.aspx "
        "Alternatively, go to: https://pytorch.org to install a PyTorch version that has been compiled with your "
        "version of the CUDA driver. (Triggered internally at /pytorch/c10/cuda/CUDAFunctions.cpp:119.)"
    )
    assert torch_message_line(raw) == "The NVIDIA driver on your system is too old (found version 12040)"
    assert len(torch_message_line("x" * 1000)) == 240


def test_torch_build_reads_the_installed_torch() -> None:
    """torch_build reports the installed torch as its metadata names it, and a CPU build as unusable for CUDA."""
    version = installed_torch_version()
    build = torch_build()
    assert build.version == version
    if version is None:
        assert build.error is not None and not build.cuda_available
    elif build.cuda is None:
        assert (build.cuda_available, build.device_count) == (False, 0)
    else:
        assert build.cuda_available == (build.device_count > 0)


def _config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "miner.toml"
    path.write_text(
        f'state_dir = "{tmp_path / "state"}"\n{extra}\n[[models]]\nname = "m"\nrunner = "fake"\n', encoding="utf-8"
    )
    return path


def test_probe_shows_the_torch_line(tmp_path: Path) -> None:
    """probe's report and text hold the torch line for the driver NVML reports (FakeNvml: R550, CUDA 12.4)."""
    report = gather(_config(tmp_path), h200s(2))
    torch = report["torch"]
    assert (torch["index"], torch["index_url"]) == ("cu126", "https://download.pytorch.org/whl/cu126")
    assert torch["version"] == installed_torch_version()
    assert "CUDA <= 12.4" in torch["line"] and torch["line"] in render_text(report)
    if torch["version"] is not None:
        assert f"torch {torch['version']}" in torch["line"]
    if torch["version"] is not None and torch["cuda"] is None:
        assert torch["fits"] is False and "does not fit" in torch["line"]


def test_probe_with_gpus_disabled_says_so(tmp_path: Path) -> None:
    """gpus.enabled = false: the torch line says the models run on the CPU and names the CPU index."""
    report = gather(
        _config(tmp_path, "[gpus]\nenabled = false"),
        FakeNvml([FakeGpu()], driver_version="580.65.06", cuda_driver_version=13000),
    )
    assert report["torch"]["fits"] is None and "gpus.enabled = false" in report["torch"]["line"]
    assert report["torch"]["index"] == "cpu"


def _simulated_host(tmp_path: Path) -> Path:
    path = tmp_path / "host.json"
    path.write_text(
        json.dumps(
            {"driver": "580.65.06", "cuda": "13.0", "gpus": [{"index": 0, "name": "NVIDIA H200", "memory_mb": 143771}]}
        ),
        encoding="utf-8",
    )
    return path


def _run_probe(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AITBC_MINER_")}
    env["AITBC_MINER_FAKE_NVML"] = str(_simulated_host(tmp_path))
    return subprocess.run(
        [sys.executable, "-m", "miner", "probe", "--config", str(_config(tmp_path)), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_probe_cli_json_on_a_simulated_r580_host(tmp_path: Path) -> None:
    """`aitbc-miner probe --json` with AITBC_MINER_FAKE_NVML: warning on stderr, the torch fit against CUDA 13.0 in JSON."""
    proc = _run_probe(tmp_path, "--json")
    assert proc.returncode == 0, proc.stderr
    assert "SIMULATED GPU HOST" in proc.stderr
    report = json.loads(proc.stdout)
    torch = report["torch"]
    assert report["cuda"] == "13.0" and report["simulated_host"].startswith("SIMULATED GPU HOST")
    assert torch["index"] == "cu130" and "driver 580.65.06 (CUDA <= 13.0)" in torch["line"]
    assert torch["version"] == installed_torch_version()


def test_probe_cli_text_prints_the_simulation_warning_first(tmp_path: Path) -> None:
    """In text mode the simulated-host warning is the first line, and the torch line is there."""
    proc = _run_probe(tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("SIMULATED GPU HOST")
    assert any("(CUDA <= 13.0)" in line and line.startswith("torch") for line in lines)
