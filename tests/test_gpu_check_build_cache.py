"""bench/gpu_check.sh's carried build: the build step saves the extension to $OUT with a stamp of
its inputs, and a later call reuses it only when the stamp matches and the module loads.

Runs the script's own functions (build_stamp, save_build, restore_carried_build) in bash on a
copy of the sources. A stand-in extension module (a few lines of C, compiled here) plays the
built _C; pip is stubbed, since the copy has nothing to install."""

import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FUNCTIONS = ("build_stamp", "restore_carried_build", "save_build")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("gcc") is None,
                                reason="needs bash and gcc")


def _script_functions() -> str:
    """The bodies of FUNCTIONS, cut out of gpu_check.sh (each ends at its first column-0 brace)."""
    lines = (REPO / "bench" / "gpu_check.sh").read_text().splitlines()
    out = []
    for name in FUNCTIONS:
        start = lines.index(f"{name}() {{")
        end = lines.index("}", start)
        out.extend(lines[start:end + 1])
    return "\n".join(out)


@pytest.fixture
def checkout(tmp_path):
    """A copy of what the stamp reads and of the Python package, a stand-in _C, a stub pip."""
    root = tmp_path / "repo"
    shutil.copytree(REPO / "csrc", root / "csrc")
    shutil.copy(REPO / "setup.py", root / "setup.py")
    shutil.copytree(REPO / "python", root / "python", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    source = tmp_path / "c.c"
    source.write_text(textwrap.dedent("""\
        #include <Python.h>
        static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", NULL, -1, NULL};
        PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&def); }
        """))
    module = tmp_path / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").exists():
        pytest.skip("no Python.h to build the stand-in extension")
    subprocess.run(["gcc", "-shared", "-fPIC", f"-I{include}", str(source), "-o", str(module)], check=True)
    python = tmp_path / "python-with-stub-pip"
    python.write_text(f'#!/bin/bash\n[ "$1 $2" = "-m pip" ] && exit 0\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    return root, module, python


def _bash(root: Path, python: Path, body: str) -> subprocess.CompletedProcess:
    script = f"set -u\nPYTHON={python}\nEXT_CACHE=.ext-cache\n{_script_functions()}\n{body}\n"
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "PYTHONPATH": str(root / "python"),
           "HOME": str(root)}
    return subprocess.run(["bash", "-c", script], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_stamp_follows_sources_and_arch(checkout):
    root, _, python = checkout
    stamps = _bash(root, python, "build_stamp 9.0a; build_stamp 9.0a; build_stamp 8.0; "
                                 "echo '// edit' >>csrc/ops/rope.cu; build_stamp 9.0a").stdout.split()
    assert len(stamps) == 4
    assert stamps[0] == stamps[1]
    assert stamps[2] != stamps[0]  # another arch list
    assert stamps[3] != stamps[0]  # another source


def test_a_carried_build_is_reused_only_when_its_stamp_matches(checkout, tmp_path):
    root, module, python = checkout
    out = tmp_path / "out"
    shutil.copy(module, root / "python" / "thinkfuse" / module.name)
    saved = _bash(root, python, f"OUT={out} save_build stamp-a")
    assert saved.returncode == 0, saved.stderr
    archive = "thinkfuse-ext.tar.xz" if shutil.which("xz") else "thinkfuse-ext.tgz"
    assert sorted(p.name for p in out.iterdir()) == sorted(["thinkfuse-ext.stamp", archive])
    assert "saved the build" in saved.stdout
    (root / "python" / "thinkfuse" / module.name).unlink()
    shutil.copytree(out, root / ".ext-cache")

    stale = _bash(root, python, "restore_carried_build stamp-b")
    assert stale.returncode != 0 and "other sources" in stale.stdout
    assert not list((root / "python" / "thinkfuse").glob("_C*"))

    reused = _bash(root, python, "restore_carried_build stamp-a")
    assert reused.returncode == 0, reused.stdout + reused.stderr
    assert "reused the carried build" in reused.stdout
    assert (root / "python" / "thinkfuse" / module.name).exists()


def test_a_carried_build_that_does_not_load_is_removed(checkout, tmp_path):
    root, module, python = checkout
    broken = root / "python" / "thinkfuse" / module.name
    broken.write_text("not an ELF file")
    assert _bash(root, python, f"OUT={tmp_path / 'out'} save_build stamp-a").returncode == 0
    broken.unlink()
    shutil.copytree(tmp_path / "out", root / ".ext-cache")
    result = _bash(root, python, "restore_carried_build stamp-a")
    assert result.returncode != 0 and "does not install or load" in result.stdout
    assert not broken.exists()  # the full build then runs on a clean tree


def test_no_out_directory_saves_nothing(checkout, tmp_path):
    root, module, python = checkout
    shutil.copy(module, root / "python" / "thinkfuse" / module.name)
    result = _bash(root, python, "unset OUT; save_build stamp-a")
    assert result.returncode == 0, result.stderr
    assert not list(tmp_path.rglob("thinkfuse-ext.*"))
