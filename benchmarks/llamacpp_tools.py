"""llama.cpp's command-line tools, built from the same source as the installed llama-cpp-python.

`benchmarks/gguf.py` measures CompactGPT's GGUF files with llama.cpp's own programs
(llama-quantize, llama-perplexity, llama-imatrix, llama-bench). The Python package ships only the
library, so the tools are compiled once from the package's source distribution (it vendors
llama.cpp under vendor/llama.cpp) into a cache folder, and found there afterwards:

    ~/.cache/compactgpt/llama.cpp-<version>/      (or $COMPACTGPT_LLAMACPP_CACHE)
        src/         the extracted source distribution
        build/bin/   the tools (static: no shared libraries to find at run time)
        tools.json   version, llama.cpp commit, tool paths: written last, so its presence means done

    python -m benchmarks.llamacpp_tools [--sdist llama_cpp_python-X.tar.gz] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from compactgpt.errors import ConfigError

TOOLS = ("llama-quantize", "llama-perplexity", "llama-imatrix", "llama-bench")
PACKAGE = "llama-cpp-python"
CACHE_ENV = "COMPACTGPT_LLAMACPP_CACHE"
# Static tools built for this CPU. The server, tests and examples are not needed (and the server
# would pull in OpenSSL); LLAMA_CURL is deprecated in recent trees, LLAMA_OPENSSL replaced it.
CMAKE_OPTIONS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
                 "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF")


def installed_version() -> str | None:
    """The installed llama-cpp-python version, or None."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return None


def sdist_version(sdist: Path) -> str:
    """The version in a source distribution's file name (llama_cpp_python-0.3.36.tar.gz)."""
    name = sdist.name
    for suffix in (".tar.gz", ".tgz", ".zip"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if "-" not in name:
        raise ConfigError(f"{sdist}: cannot read a version from the file name; name it "
                          f"llama_cpp_python-<version>.tar.gz as the package index does")
    return name.rsplit("-", 1)[1]


def default_cache(version: str) -> Path:
    """Where the tools for `version` are built: $COMPACTGPT_LLAMACPP_CACHE or ~/.cache/compactgpt."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / f"llama.cpp-{version}"
    return Path.home() / ".cache" / "compactgpt" / f"llama.cpp-{version}"


def vendor_commit(tree: Path) -> str:
    """The llama.cpp commit of a vendored tree, read from git's files (no git needed); 'unknown'
    when the source distribution carries no git metadata."""
    dotgit = tree / ".git"
    try:
        if dotgit.is_file():  # a submodule: "gitdir: ../../.git/modules/vendor/llama.cpp"
            dotgit = (tree / dotgit.read_text().split(":", 1)[1].strip()).resolve()
        head = (dotgit / "HEAD").read_text().strip()
        if head.startswith("ref:"):
            ref = head.split(None, 1)[1]
            ref_file = dotgit / ref
            if ref_file.exists():
                return ref_file.read_text().strip()
            for line in (dotgit / "packed-refs").read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0]
            return "unknown"
        return head
    except (OSError, IndexError):
        return "unknown"


def _require_build_tools() -> None:
    missing = [t for t in ("cmake", "c++", "cc") if shutil.which(t) is None]
    if missing:
        raise ConfigError(f"building llama.cpp's tools needs {', '.join(missing)} on PATH; install "
                          f"cmake and a C/C++ compiler (Debian: apt-get install cmake g++), or pass "
                          f"--llamacpp-cache pointing at a folder where they are built")


def _download_sdist(version: str, into: Path, log) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", f"{PACKAGE}=={version}", "--no-deps",
           "--no-binary", ":all:", "-d", str(into)]
    log("llama.cpp tools: " + " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(into.glob("llama_cpp_python-*.tar.gz"))
    if done.returncode != 0 or not found:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ConfigError(f"could not download the {PACKAGE} {version} source distribution "
                          f"({tail[0]}); pass its path with --llamacpp-sdist")
    return found[0]


def _extract(sdist: Path, into: Path) -> Path:
    with tarfile.open(sdist) as tar:
        try:
            tar.extractall(into, filter="tar")  # no links or devices out of the folder
        except TypeError:  # Pythons before the extraction filters
            tar.extractall(into)
    roots = [p for p in into.iterdir() if (p / "vendor" / "llama.cpp" / "CMakeLists.txt").exists()]
    if not roots:
        raise ConfigError(f"{sdist} has no vendor/llama.cpp tree; pass a {PACKAGE} source "
                          f"distribution (.tar.gz)")
    return roots[0] / "vendor" / "llama.cpp"


def _run(cmd: list[str], log_file: Path, log) -> None:
    log("llama.cpp tools: " + " ".join(cmd))
    with open(log_file, "a") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        lines = log_file.read_text(errors="replace").strip().splitlines()
        errors = [line for line in lines if "error" in line.lower()] or lines
        raise ConfigError(f"building llama.cpp's tools failed ({errors[-1].strip() if errors else '?'}); "
                          f"the full log is {log_file}")


def llamacpp_tools(cache: Path | str | None = None, log=print, sdist: Path | str | None = None,
                   jobs: int = 2) -> dict[str, Path]:
    """Paths of llama.cpp's tools (TOOLS), built from the installed llama-cpp-python's source.

    cache: the build folder (default: default_cache(version)); sdist: a local source distribution
    to build from instead of downloading the installed version's. When neither the package is
    installed nor sdist is given, raises ConfigError. Builds once; later calls read tools.json.
    Returns {tool name: path}. Raises ConfigError when cmake or a compiler is missing or the build
    fails (one line, naming the log).
    """
    sdist = Path(sdist) if sdist else None
    version = installed_version()
    if sdist is not None:
        version_of_sdist = sdist_version(sdist)
        if version and version != version_of_sdist:
            log(f"llama.cpp tools: note: {sdist.name} is {version_of_sdist}, the installed "
                f"{PACKAGE} is {version}; building from the given source")
        version = version_of_sdist
    if version is None:
        raise ConfigError(f"{PACKAGE} is not installed; install it (pip install {PACKAGE}) or pass "
                          f"its source distribution with --llamacpp-sdist")
    cache = Path(cache).expanduser() if cache else default_cache(version)
    marker = cache / "tools.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        tools = {name: cache / rel for name, rel in info["tools"].items()}
        if info.get("version") == version and all(p.exists() for p in tools.values()) \
                and set(tools) >= set(TOOLS):
            log(f"llama.cpp tools: cached in {cache} ({PACKAGE} {version}, llama.cpp "
                f"{info.get('commit', 'unknown')[:12]})")
            return tools
    _require_build_tools()
    cache.mkdir(parents=True, exist_ok=True)
    log(f"llama.cpp tools: building {', '.join(TOOLS)} from {PACKAGE} {version} into {cache} "
        f"(once; several minutes)")
    src = cache / "src"
    if not any(src.glob("*/vendor/llama.cpp/CMakeLists.txt")):
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            archive = sdist or _download_sdist(version, Path(tmp), log)
            log(f"llama.cpp tools: extracting {archive}")
            staged = Path(tmp) / "src"
            staged.mkdir()
            _extract(archive, staged)
            shutil.rmtree(src, ignore_errors=True)
            staged.rename(src)
    tree = next(src.glob("*/vendor/llama.cpp"))
    build, log_file = cache / "build", cache / "build.log"
    log_file.write_text("")
    _run(["cmake", "-S", str(tree), "-B", str(build), *CMAKE_OPTIONS], log_file, log)
    _run(["cmake", "--build", str(build), "-j", str(jobs), "--target", *TOOLS], log_file, log)
    tools = {name: build / "bin" / name for name in TOOLS}
    absent = [name for name, p in tools.items() if not p.exists()]
    if absent:
        raise ConfigError(f"the llama.cpp build finished without {', '.join(absent)}; see {log_file}")
    info = {"version": version, "commit": vendor_commit(tree), "cmake_options": list(CMAKE_OPTIONS),
            "tools": {name: str(p.relative_to(cache)) for name, p in tools.items()}}
    tmp_marker = marker.with_suffix(".json.tmp")
    tmp_marker.write_text(json.dumps(info, indent=2) + "\n")
    tmp_marker.replace(marker)
    log(f"llama.cpp tools: built; cached in {cache}")
    return tools


def llamacpp_info(tools: dict[str, Path]) -> dict:
    """Version, commit and CMake options recorded beside the tools (tools.json)."""
    marker = next(iter(tools.values())).parents[2] / "tools.json"
    try:
        return json.loads(marker.read_text())
    except OSError:
        return {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=None,
                    help=f"build folder (default: ${CACHE_ENV} or ~/.cache/compactgpt, /llama.cpp-<version>)")
    ap.add_argument("--sdist", type=Path, default=None,
                    help=f"a local {PACKAGE} source distribution to build from (default: download "
                         f"the installed version's)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compile jobs")
    args = ap.parse_args(argv)
    try:
        tools = llamacpp_tools(args.cache, sdist=args.sdist, jobs=args.jobs)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, path in tools.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
