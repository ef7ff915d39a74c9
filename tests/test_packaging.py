"""The package as users get it: build the sdist and wheel, check them, install the wheel into a
fresh virtual environment and use it from there, away from the source tree.

Offline by construction: the build runs without isolation on the setuptools already installed
(the ``dev`` extra), the wheel is installed with ``--no-deps --no-index``, and the new
environment sees the already installed torch (and the ``bench`` extra's packages, for
``mbf-bench``) through a ``.pth`` file that names their folders. Nothing is downloaded, torch
least of all. Deselect with ``-m "not packaging"``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.packaging

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGES = ("mbf", "mbf_bench")
# What the installed wheel imports, and so must find beside it (torch; the bench extra).
RUNTIME = ("torch", "numpy", "scipy", "sklearn", "matplotlib", "tqdm")


def _require_build_tools() -> None:
    """Skip, naming what is missing, unless every tool the offline build needs is installed."""
    from packaging.requirements import Requirement  # a dependency of build

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    build_requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    for text in [*build_requires["requires"], "build", "twine"]:
        req = Requirement(text)
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"{req.name} is not installed (the dev extra): cannot build offline")
        if not req.specifier.contains(version, prereleases=True):
            pytest.skip(f"installed {req.name} {version} does not satisfy {text}")


def _run(cmd: list[str | Path], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run a command; on failure, fail the test with its output."""
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc.stdout


def _source_files() -> set[str]:
    """The package files a user needs: every module and marker under src/, relative to it."""
    files = set()
    for pkg in PACKAGES:
        for path in (SRC / pkg).rglob("*"):
            wanted = path.suffix == ".py" or path.name == "py.typed"
            if wanted and path.is_file() and "__pycache__" not in path.parts:
                files.add(path.relative_to(SRC).as_posix())
    return files


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """sdist and wheel built the way ``python -m build`` does (the wheel from the sdist)."""
    _require_build_tools()
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT], cwd=ROOT)
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


def test_twine_check_passes(dist: dict[str, Path]) -> None:
    out = _run(
        [sys.executable, "-m", "twine", "check", "--strict", dist["sdist"], dist["wheel"]],
        cwd=ROOT,
    )
    assert out.count("PASSED") == 2, out


def test_wheel_and_sdist_carry_every_package_file(dist: dict[str, Path]) -> None:
    import mbf

    expected = _source_files()
    assert "mbf/py.typed" in expected and "mbf_bench/py.typed" in expected
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        names = set(wheel.namelist())
        info = f"mbf_optim-{mbf.__version__}.dist-info"
        assert f"{info}/entry_points.txt" in names, "the wheel declares no entry point"
        metadata = wheel.read(f"{info}/METADATA").decode()
        entry_points = wheel.read(f"{info}/entry_points.txt").decode()
    assert not expected - names, f"missing from the wheel: {sorted(expected - names)}"
    assert f"{info}/licenses/LICENSE" in names
    assert re.search(r"^mbf-bench\s*=\s*mbf_bench\.launcher:main$", entry_points, re.M), (
        entry_points
    )
    assert f"\nVersion: {mbf.__version__}\n" in metadata  # the one version, read from mbf
    assert "\nLicense-Expression: MIT\n" in metadata
    requires = re.findall(r"^Requires-Dist: torch(.*)$", metadata, re.M)
    assert requires == [">=2.3"], f"torch must stay a bare lower bound, got {requires}"

    root = f"mbf_optim-{mbf.__version__}"
    with tarfile.open(dist["sdist"]) as sdist:
        members = {m.removeprefix(root + "/") for m in sdist.getnames()}
    wanted = {f"src/{f}" for f in expected} | {"LICENSE", "README.md", "CHANGELOG.md"}
    assert not wanted - members, f"missing from the sdist: {sorted(wanted - members)}"


def _readme_example() -> str:
    """The first Python block of the README's "Using the optimizer" section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Using the optimizer", 1)
    assert len(section) == 2, "README has no 'Using the optimizer' section"
    match = re.search(r"```python\n(.*?)```", section[1], re.S)
    assert match, "the 'Using the optimizer' section has no python block"
    return match.group(1)


@pytest.fixture(scope="module")
def installed(dist: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only the wheel, installed with ``--no-deps`` (its ``bin`` folder)."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False, clear=True).create(env_dir)
    bindir = Path(sysconfig.get_path("scripts", vars={"base": env_dir, "platbase": env_dir}))
    python = bindir / "python"
    _runtime_pth(python, env_dir)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "install",
            "--no-deps",
            "--no-index",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--quiet",
            dist["wheel"],
        ],
        cwd=env_dir,
    )
    return bindir


def _runtime_pth(python: Path, cwd: Path) -> None:
    """Let the venv of ``python`` see the already installed runtime packages, by their folders:
    a plain path in a .pth file adds that folder only (its own .pth files, such as an editable
    install's, are not read)."""
    purelib = Path(
        _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=cwd)
        .strip()
    )
    folders = []
    for name in RUNTIME:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            pytest.skip(f"{name} is not installed (the bench extra): mbf-bench cannot run")
        folder = str(Path(spec.origin).resolve().parents[1])
        if folder not in folders:
            folders.append(folder)
    assert str(SRC) not in folders
    (purelib / "_mbf_test_runtime.pth").write_text("\n".join(folders) + "\n")


def _clean_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    }
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    return env


def test_installed_wheel_runs_readme_example(installed: Path, tmp_path: Path) -> None:
    import mbf

    env = _clean_env()
    where = _run(
        [
            installed / "python",
            "-c",
            "import importlib.metadata as m, mbf; print(mbf.__file__, mbf.__version__, "
            "m.version('mbf-optim'))",
        ],
        cwd=tmp_path,
        env=env,
    ).split()
    # The installed copy, not the checkout.
    assert Path(where[0]).resolve().is_relative_to(installed.parent.resolve()), where
    assert where[1:] == [mbf.__version__, mbf.__version__], where

    script = tmp_path / "example.py"
    script.write_text(_readme_example())
    out = _run([installed / "python", script], cwd=tmp_path, env=env)
    match = re.search(r"final loss (\S+) \{'steps': 100,", out)
    assert match, out
    assert float(match.group(1)) < 2.0  # log(10) = 2.30 at the start: it trained


def test_installed_entry_point_lists_tasks(installed: Path, tmp_path: Path) -> None:
    script = installed / "mbf-bench"
    assert script.is_file(), "installing the wheel made no mbf-bench command"
    out = _run([script, "list"], cwd=tmp_path, env=_clean_env())
    for name in ("mnist-ae", "digits-ae", "mbf", "adam"):
        assert name in out, out


def test_entry_point_without_bench_extra_says_what_to_install(
    installed: Path, tmp_path: Path
) -> None:
    """``pip install mbf-optim`` alone: mbf-bench names the bench extra instead of a traceback."""
    code = (
        "import sys; sys.modules['numpy'] = None  # as if numpy were not installed\n"
        "from mbf_bench.launcher import main; sys.exit(main(['list']))"
    )
    proc = subprocess.run(
        [installed / "python", "-c", code],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "numpy is not installed" in proc.stderr, proc.stderr
    assert "pip install 'mbf-optim[bench]'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_launcher_knows_every_package_of_the_bench_extra() -> None:
    from packaging.requirements import Requirement

    from mbf_bench.launcher import BENCH_IMPORTS

    metadata = importlib.metadata.metadata("mbf-optim")
    bench = {
        Requirement(r).name
        for r in metadata.get_all("Requires-Dist") or []
        if 'extra == "bench"' in r
    }
    assert bench == set(BENCH_IMPORTS), (bench, BENCH_IMPORTS)


# ----------------------------------------------------------------------------- README's install

INSTALL_MARK = "<!-- install: run as written by tests/test_packaging.py -->"
# What a build from the repository's folder reads (setuptools adds the rest of the sdist itself).
PROJECT_FILES = ("pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "MANIFEST.in")


def readme_install_blocks() -> list[list[str]]:
    """The commands of each bash block of README's Install section marked with INSTALL_MARK,
    comments dropped. The section must open with such a block: the first command a newcomer
    types works before any release, and ``pip install mbf-optim`` appears only as "once
    released"."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Install\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"(<!-- install:[^>]*-->\n)?```bash\n(.*?)```", section, re.S)
    assert blocks and blocks[0][0].strip() == INSTALL_MARK, "Install must open with a tested block"
    for _, body in blocks:  # every command that asks the index for mbf-optim says "not yet"
        for line in body.splitlines():
            if re.search(r"pip install [\"']?mbf-optim\b", line):
                assert "once released" in line, line

    def commands(body: str) -> list[str]:
        return [c for c in (line.split("#", 1)[0].strip() for line in body.splitlines()) if c]

    return [commands(body) for mark, body in blocks if mark.strip() == INSTALL_MARK]


def test_readme_install_blocks_are_found() -> None:
    blocks = readme_install_blocks()
    assert blocks[0] == ['pip install ".[bench]"']
    assert len(blocks) == 2 and blocks[1][0].startswith("pip wheel")


def _clone(tmp: Path) -> Path:
    """The repository's folder as a newcomer has it: the project files and src/, no build."""
    import shutil

    clone = tmp / "mbf"
    clone.mkdir()
    for name in PROJECT_FILES:
        shutil.copy2(ROOT / name, clone / name)
    shutil.copytree(SRC, clone / "src", ignore=shutil.ignore_patterns(
        "__pycache__", "*.egg-info", "*.pyc"))
    return clone


@pytest.mark.parametrize("block", range(2))
def test_readme_install_commands_work_as_written(block: int, tmp_path: Path) -> None:
    """Each tested block of README's Install section, run by bash in a copy of the repository's
    folder with a fresh venv's ``pip`` and ``python`` first on PATH, installs an ``mbf`` that
    imports from the venv and an ``mbf-bench`` that runs. Offline by the environment, not by
    the commands: pip reads ``PIP_NO_INDEX``, ``PIP_NO_DEPS`` and ``PIP_NO_BUILD_ISOLATION``,
    and the dependencies come from the installed ones (a .pth file, as above)."""
    _require_build_tools()
    commands = readme_install_blocks()[block]
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)  # ensurepip: offline
    bindir = Path(sysconfig.get_path("scripts", vars={"base": env_dir, "platbase": env_dir}))
    # Python < 3.12's ensurepip also brings an old setuptools, which would shadow the installed
    # one the build needs (pyproject.toml's build-system requirement).
    _run([bindir / "python", "-m", "pip", "uninstall", "--yes", "--quiet", "setuptools"],
         cwd=tmp_path)
    _runtime_pth(bindir / "python", tmp_path)
    clone = _clone(tmp_path)
    env = _clean_env()
    env.update(PATH=f"{bindir}{os.pathsep}{env['PATH']}", VIRTUAL_ENV=str(env_dir),
               PIP_NO_INDEX="1", PIP_NO_DEPS="1", PIP_NO_BUILD_ISOLATION="0",
               PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_CACHE_DIR="1")
    _run(["bash", "-e", "-c", "\n".join(commands)], cwd=clone, env=env)
    where = _run([bindir / "python", "-c", "import mbf; print(mbf.__file__)"],
                 cwd=tmp_path, env=env).strip()
    assert Path(where).resolve().is_relative_to(env_dir.resolve()), where
    out = _run([bindir / "mbf-bench", "list"], cwd=tmp_path, env=env)
    assert "mnist-ae" in out and "tnt (not validated)" in out, out
