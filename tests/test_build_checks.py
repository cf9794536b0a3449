"""scripts/cxx_runtime.py: the probe setup.py and gpu_check.sh use to refuse a C++ compiler that
links libstdc++ statically (an extension built so crashes on its first raised error)."""

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from cxx_runtime import build_cxx_compilers, links_libstdcxx_statically, static_libstdcxx_compiler  # noqa: E402

needs_toolchain = pytest.mark.skipif(shutil.which("g++") is None or shutil.which("nm") is None,
                                     reason="needs g++ and nm")


@needs_toolchain
def test_dynamic_g_plus_plus_passes():
    assert links_libstdcxx_statically("g++") is False


@needs_toolchain
def test_a_static_libstdcxx_wrapper_is_caught(tmp_path):
    wrapper = tmp_path / "g++-static"
    wrapper.write_text('#!/bin/sh\nexec g++ -static-libstdc++ "$@"\n')
    wrapper.chmod(0o755)
    assert links_libstdcxx_statically(str(wrapper)) is True
    assert links_libstdcxx_statically("g++ -static-libstdc++") is True  # flags in $CXX too


def test_no_compiler_means_cannot_tell(tmp_path):
    assert links_libstdcxx_statically(str(tmp_path / "no-such-compiler")) is None
    assert links_libstdcxx_statically("") is None


@needs_toolchain
def test_the_build_compilers_and_the_first_static_one(tmp_path, monkeypatch):
    wrapper = tmp_path / "g++-static"
    wrapper.write_text('#!/bin/sh\nexec g++ -static-libstdc++ "$@"\n')
    wrapper.chmod(0o755)
    assert static_libstdcxx_compiler(["g++", str(wrapper)]) == str(wrapper)
    assert static_libstdcxx_compiler(["g++"]) is None
    monkeypatch.setenv("CXX", str(wrapper))
    assert build_cxx_compilers() == [str(wrapper)]  # $CXX decides for torch and setuptools alike
    monkeypatch.delenv("CXX")
    assert str(wrapper) not in build_cxx_compilers()
