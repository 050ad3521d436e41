"""Checkpoint files: listing, reading and checking BlockFFN weights (SPEC.md §1).

Shared by the reference model, the CLI and the front-end preflight that rejects a
bad checkpoint before vLLM starts its workers. No vLLM imports here.

Every problem with a file is a `BlockFFNFileError` whose message is one line: the file's
path, what is wrong with it and what was expected. Files are checked without reading
tensor data: a safetensors file by its header alone (the 8-byte header length, the JSON
header, and the file size that the header's data offsets require — the rules the
safetensors library applies when it opens a file), a `.bin` by its zip directory and a
memory-mapped `torch.load` (which reads the pickled names, dtypes and shapes only). Only
`nonfinite_weights` reads tensor data. torch is imported only where tensors are read, so
`vllm-blockffn check` names a broken safetensors file or config.json in a fraction of a second.
"""

from __future__ import annotations

import glob
import json
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm_blockffn.serving.config import BlockFFNSpec

if TYPE_CHECKING:
    import torch

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# safetensors dtype code → (torch dtype name, bytes per element)
SAFETENSORS_DTYPES = {
    "BOOL": ("bool", 1), "U8": ("uint8", 1), "I8": ("int8", 1),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E4M3FNUZ": ("float8_e4m3fnuz", 1),
    "F8_E5M2": ("float8_e5m2", 1), "F8_E5M2FNUZ": ("float8_e5m2fnuz", 1), "F8_E8M0": ("float8_e8m0fnu", 1),
    "I16": ("int16", 2), "U16": ("uint16", 2), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I32": ("int32", 4), "U32": ("uint32", 4), "F32": ("float32", 4),
    "I64": ("int64", 8), "U64": ("uint64", 8), "F64": ("float64", 8), "C64": ("complex64", 8),
}
FLOAT_DTYPES = ("bfloat16", "float16", "float32", "float64")
EXPECTED_FLOAT = "a floating-point dtype (bfloat16, float16 or float32)"
# Integer tensors a BlockFFN/FR-Spec EAGLE head may hold (vocabulary maps); every other weight is a float.
INDEX_TENSORS = ("token_id_remap", "d2t", "t2d")
# The tensors that make a folder an EAGLE head (as vllm_blockffn.serving.eagle.REQUIRED / PREFIXES).
HEAD_TENSORS = ("fc.weight", "input_norm1.weight", "input_norm2.weight")
HEAD_PREFIXES = ("model.", "eagle.", "")
MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own limit
NOT_WEIGHTS = ("training_args.bin", "optimizer.bin")  # *.bin files vLLM's loader skips too
SCAN_ELEMENTS = 1 << 24  # values per slice read by nonfinite_weights


class BlockFFNWeightError(ValueError):
    """A checkpoint tensor that is missing or has a shape the config does not allow."""


class BlockFFNFileError(BlockFFNWeightError):
    """A checkpoint file that is missing, truncated, unreadable or not in the format its name says,
    or a tensor in it with a dtype or values no model can use. One line: path, problem, expectation."""


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as its file describes it (nothing of its data read)."""

    name: str
    file: str
    dtype: str  # torch's name without "torch.", e.g. "bfloat16"
    shape: tuple[int, ...]


def _first_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


# ---------------------------------------------------------------------------------------------
# JSON files
# ---------------------------------------------------------------------------------------------


def read_json(file: str, expected: str) -> Any:
    """A JSON file's content; BlockFFNFileError with the path (and line/column) otherwise."""
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise BlockFFNFileError(f"{file}: missing; expected {expected}") from e
    except json.JSONDecodeError as e:
        raise BlockFFNFileError(f"{file}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}; "
                                f"expected {expected}") from e
    except UnicodeDecodeError as e:
        raise BlockFFNFileError(f"{file}: not valid JSON: not UTF-8 text (byte {e.start}); expected {expected}") from e
    except OSError as e:
        raise BlockFFNFileError(f"{file}: cannot be read ({e.strerror or e}); expected {expected}") from e


def read_config(path: str | os.PathLike) -> dict:
    """config.json of a checkpoint folder as a dict (BlockFFNFileError naming the file otherwise)."""
    file = os.path.join(os.fspath(path), "config.json")
    cfg = read_json(file, "a JSON object of config fields")
    if not isinstance(cfg, dict):
        raise BlockFFNFileError(f"{file}: holds a JSON {type(cfg).__name__}; expected a JSON object of config fields")
    return cfg


def _index_files(index: str) -> list[str]:
    """The shard files an index names, each checked to exist."""
    expected = 'an index {"weight_map": {tensor name: shard file}}'
    data = read_json(index, expected)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise BlockFFNFileError(f"{index}: has no 'weight_map' object naming a shard file for each tensor; "
                                f"expected {expected}")
    by_file: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_file.setdefault(shard, []).append(name)
    files = []
    for shard in sorted(by_file):
        file = os.path.join(os.path.dirname(index), shard)
        if not os.path.isfile(file):
            names = by_file[shard]
            raise BlockFFNFileError(f"{file}: missing; {os.path.basename(index)} names it as the shard holding "
                                    f"{len(names)} weight(s), e.g. '{names[0]}'")
        files.append(file)
    return files


# ---------------------------------------------------------------------------------------------
# Which files
# ---------------------------------------------------------------------------------------------


def weight_files(path: str | os.PathLike) -> list[str]:
    """The weight files of a BlockFFN checkpoint folder, safetensors preferred (as vLLM does)."""
    path = os.fspath(path)
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = os.path.join(path, index_name)
        if os.path.exists(index):
            return _index_files(index)
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(path, single)):
            return [os.path.join(path, single)]
    raise BlockFFNWeightError(f"{path}: no weights found (expected model.safetensors, "
                              f"{SAFE_INDEX}, pytorch_model.bin or {BIN_INDEX})")


def folder_weight_files(path: str | os.PathLike) -> list[str]:
    """The weight files any loader would read from a model folder (an EAGLE head, or any model):
    the shards an index names, else every *.safetensors, else every *.bin (not training state)."""
    path = os.fspath(path)
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = os.path.join(path, index_name)
        if os.path.exists(index):
            return _index_files(index)
    files = sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors")))
    if files:
        return files
    return [f for f in sorted(glob.glob(os.path.join(glob.escape(path), "*.bin")))
            if os.path.basename(f) not in NOT_WEIGHTS]


# ---------------------------------------------------------------------------------------------
# Reading one file's table of contents
# ---------------------------------------------------------------------------------------------


def _safetensors_infos(file: str) -> dict[str, TensorInfo]:
    """Names, dtypes and shapes from a safetensors header; the header and file size validated."""
    expected = "a complete safetensors file"
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise BlockFFNFileError(f"{file}: truncated: {size} bytes, not even the 8-byte header length; "
                                        f"expected {expected}")
            n = int.from_bytes(head, "little")
            if n > MAX_SAFETENSORS_HEADER:
                raise BlockFFNFileError(f"{file}: not a safetensors file (its first 8 bytes give a header of {n} "
                                        f"bytes); expected {expected}")
            if 8 + n > size:
                raise BlockFFNFileError(f"{file}: truncated or not a safetensors file: its header needs {8 + n} "
                                        f"bytes but the file has {size}; expected {expected}")
            raw = f.read(n)
    except FileNotFoundError as e:
        raise BlockFFNFileError(f"{file}: missing; expected {expected}") from e
    except OSError as e:
        raise BlockFFNFileError(f"{file}: cannot be read ({e.strerror or e}); expected {expected}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BlockFFNFileError(f"{file}: not a safetensors file: its header is not JSON ({_first_line(e)}); "
                                f"expected {expected}") from e
    if not isinstance(header, dict):
        raise BlockFFNFileError(f"{file}: not a safetensors file: its header is a JSON {type(header).__name__}; "
                                f"expected {expected}")

    def bad(name: str, what: str) -> BlockFFNFileError:
        return BlockFFNFileError(f"{file}: corrupt safetensors header: tensor '{name}' {what}; expected {expected}")

    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise bad(name, f"is described by a JSON {type(entry).__name__}")
        code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise bad(name, f"has shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise bad(name, f"has data_offsets {offsets!r}")
        if not isinstance(code, str):
            raise bad(name, f"has dtype {code!r}")
        dtype, itemsize = SAFETENSORS_DTYPES.get(code, (code, None))
        numel = 1
        for d in shape:
            numel *= d
        if itemsize is not None and numel * itemsize != offsets[1] - offsets[0]:
            raise bad(name, f"is {code} {shape} = {numel * itemsize} bytes but its data_offsets {offsets} span "
                            f"{offsets[1] - offsets[0]}")
        infos[name] = TensorInfo(name, file, dtype, tuple(shape))
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:
            raise bad(name, f"data starts at byte {start} of the data section, where the previous tensor "
                            f"{'ends' if start > end else 'is still stored'} at {end}")
        end = stop
    need = 8 + n + end
    if size < need:
        raise BlockFFNFileError(f"{file}: truncated: {size} bytes, but its header places tensor data up to byte "
                                f"{need} ({need - size} bytes missing); expected {expected}")
    if size > need:
        raise BlockFFNFileError(f"{file}: {size - need} unexpected bytes after the last tensor (the header accounts "
                                f"for {need} of its {size} bytes); expected {expected}")
    return infos


def _bin_tensors(file: str, load_legacy: bool = True) -> dict[str, torch.Tensor] | None:
    """A .bin's tensors, memory-mapped (None for a legacy-format file when not load_legacy)."""
    expected = "a PyTorch checkpoint as torch.save writes it (a zip archive of a name → tensor dict)"
    try:
        with open(file, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError as e:
        raise BlockFFNFileError(f"{file}: missing; expected {expected}") from e
    except OSError as e:
        raise BlockFFNFileError(f"{file}: cannot be read ({e.strerror or e}); expected {expected}") from e
    if zipfile.is_zipfile(file):
        try:
            with zipfile.ZipFile(file) as z:
                members = z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise BlockFFNFileError(f"{file}: damaged zip archive ({_first_line(e)}); expected {expected}") from e
        if not any(m == "data.pkl" or m.endswith("/data.pkl") for m in members):
            raise BlockFFNFileError(f"{file}: a zip archive without a data.pkl, not a PyTorch checkpoint; "
                                    f"expected {expected}")
        mmap = True
    elif magic.startswith(b"PK"):
        raise BlockFFNFileError(f"{file}: truncated or damaged zip archive (no central directory at its end); "
                                f"expected {expected}")
    elif magic[:1] == b"\x80":  # a pickle: the legacy (torch < 1.6) torch.save format, not memory-mappable
        if not load_legacy:
            return None
        mmap = False
    else:
        raise BlockFFNFileError(f"{file}: not a PyTorch checkpoint (starts with {magic!r}, neither a zip archive "
                                f"nor a pickle); expected {expected}")
    import torch

    try:
        obj = torch.load(file, map_location="cpu", mmap=mmap, weights_only=True)
    except Exception as e:
        raise BlockFFNFileError(f"{file}: cannot be read as a PyTorch checkpoint ({_first_line(e)}); "
                                f"expected {expected}") from e
    if not isinstance(obj, Mapping):
        raise BlockFFNFileError(f"{file}: holds a {type(obj).__name__}; expected {expected}")
    for name, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise BlockFFNFileError(f"{file}: entry '{name}' is a {type(value).__name__}, not a tensor; "
                                    f"expected {expected}")
    return dict(obj)


def file_tensor_info(files: Iterable[str], load_legacy_bin: bool = True) -> dict[str, TensorInfo]:
    """Every tensor of these .safetensors / .bin files, each file validated (BlockFFNFileError)."""
    infos: dict[str, TensorInfo] = {}
    for file in files:
        if file.endswith(".safetensors"):
            infos.update(_safetensors_infos(file))
        else:
            tensors = _bin_tensors(file, load_legacy=load_legacy_bin)
            for name, t in (tensors or {}).items():
                infos[name] = TensorInfo(name, file, str(t.dtype).removeprefix("torch."), tuple(t.shape))
    return infos


def check_dtypes(infos: Iterable[TensorInfo], allowed_other: tuple[str, ...] = ()) -> None:
    """Raise BlockFFNFileError for the first tensor that is not floating point (names ending in
    one of `allowed_other` excepted)."""
    for info in infos:
        if info.dtype not in FLOAT_DTYPES and not info.name.endswith(allowed_other):
            raise BlockFFNFileError(f"{info.file}: weight '{info.name}' has dtype {info.dtype}; "
                                    f"expected {EXPECTED_FLOAT}")


def iter_tensors(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (name, tensor) of the checkpoint, lazily (bin files are memory-mapped)."""
    from safetensors import safe_open

    for file in weight_files(path):
        if file.endswith(".safetensors"):
            _safetensors_infos(file)  # a bad file is named, not a bare SafetensorError
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            yield from _bin_tensors(file).items()


def tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Names and shapes without reading tensor data (safetensors headers; bin via mmap)."""
    return file_tensor_shapes(weight_files(path))


def file_tensor_shapes(files: list[str]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in these .safetensors / .bin files.

    Raises BlockFFNFileError for a file that is not readable as its name says, and for a tensor
    that is not floating point (except an EAGLE head's integer vocabulary maps, INDEX_TENSORS).
    """
    infos = file_tensor_info(files)
    check_dtypes(infos.values(), allowed_other=INDEX_TENSORS)
    return {name: info.shape for name, info in infos.items()}


def is_eagle_head(names: Iterable[str]) -> bool:
    """True when these tensor names are a BlockFFN/FR-Spec EAGLE head's (fc + input_norm1/2, any prefix)."""
    names = set(names)
    return any(all(p + n in names for n in HEAD_TENSORS) for p in HEAD_PREFIXES)


def check_folder_files(path: str | os.PathLike, load_legacy_bin: bool = True) -> dict[str, TensorInfo]:
    """Validate the weight files of any model folder (index shards present, every file readable);
    for an EAGLE head also that every weight but its vocabulary maps is floating point."""
    infos = file_tensor_info(folder_weight_files(path), load_legacy_bin=load_legacy_bin)
    if is_eagle_head(infos):
        check_dtypes(infos.values(), allowed_other=INDEX_TENSORS)
    return infos


# ---------------------------------------------------------------------------------------------
# What a BlockFFN checkpoint must hold
# ---------------------------------------------------------------------------------------------


def expected_shapes(spec: BlockFFNSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor an official checkpoint of this config holds, with its shape."""
    H, E, D = spec.hidden_size, spec.num_experts, spec.expert_size
    nh, nkv = spec.num_attention_heads, spec.num_key_value_heads
    out: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (spec.vocab_size, H),
        "model.norm.weight": (H,),
    }
    if not spec.tie_word_embeddings:
        out["lm_head.weight"] = (spec.vocab_size, H)
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (H,)
        out[p + "post_attention_layernorm.weight"] = (H,)
        if spec.attention_type == "vanilla":
            hd = spec.head_dim
            out[p + "self_attn.q_proj.weight"] = (nh * hd, H)
            out[p + "self_attn.k_proj.weight"] = (nkv * hd, H)
            out[p + "self_attn.v_proj.weight"] = (nkv * hd, H)
            out[p + "self_attn.o_proj.weight"] = (H, nh * hd)
        else:
            qr, kvr = spec.q_lora_rank, spec.kv_lora_rank
            nope, rope, v = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim
            out[p + "self_attn.q_a_proj.weight"] = (qr, H)
            out[p + "self_attn.q_a_layernorm.weight"] = (qr,)
            out[p + "self_attn.q_b_proj.weight"] = (nh * (nope + rope), qr)
            out[p + "self_attn.kv_a_proj_with_mqa.weight"] = (kvr + rope, H)
            out[p + "self_attn.kv_a_layernorm.weight"] = (kvr,)
            out[p + "self_attn.kv_b_proj.weight"] = (nh * (nope + v), kvr)
            out[p + "self_attn.o_proj.weight"] = (H, nh * v)
        out[p + "mlp.router_proj.weight"] = (E, H)
        if spec.norm_after_router == "rms":
            out[p + "mlp.router_norm.weight"] = (E,)
        if spec.ffn_type == "block":
            out[p + "mlp.up_proj"] = (E, D, H)
            out[p + "mlp.down_proj"] = (E, H, D)
        else:
            out[p + "mlp.up_proj"] = (E * D, H)
            out[p + "mlp.down_proj"] = (H, E * D)
    return out


INT8_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa")
"""Attention projections a blockffn_int8 checkpoint stores in int8 (MLA's kv_b_proj stays float)."""


def int8_tensors(spec: BlockFFNSpec, linears: bool = True) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name → (dtype, shape) of the int8 weights and fp32 scales of a `vllm-blockffn quantize`
    checkpoint (kernels/quant.py): ``mlp.up_proj`` int8 + ``mlp.up_proj_scale`` [E, D] ([E·D] for
    block_linear); ``mlp.down_proj`` int8 + ``mlp.down_proj_scale`` [E, H]; with ``linears`` the
    attention projections and an untied lm_head: ``X.weight`` int8 + ``X.weight_scale`` [N]."""
    E, D, H = spec.num_experts, spec.expert_size, spec.hidden_size
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, shape in expected_shapes(spec).items():
        if name.endswith("mlp.up_proj"):
            out[name] = ("int8", shape)
            out[name + "_scale"] = ("float32", (E, D) if spec.ffn_type == "block" else (E * D,))
        elif name.endswith("mlp.down_proj"):
            out[name] = ("int8", shape)
            out[name + "_scale"] = ("float32", (E, H))
        elif linears and (name == "lm_head.weight" or name.rsplit(".", 2)[-2] in INT8_LINEARS):
            out[name] = ("int8", shape)
            out[name + "_scale"] = ("float32", (shape[0],))
    return out


def router_weight_names(spec: BlockFFNSpec) -> list[str]:
    """The routers' tensors (router_proj, router_norm): E·H + E values per layer."""
    return [n for n in expected_shapes(spec) if ".mlp.router_" in n]


# Tensors some checkpoints carry that no model needs.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def check_weights(path: str | os.PathLike, spec: BlockFFNSpec,
                  infos: Mapping[str, TensorInfo] | None = None) -> Mapping[str, TensorInfo]:
    """Validate the weight files (unless their `infos` are given), then raise BlockFFNWeightError
    naming the first missing tensor, wrong shape or non-floating-point dtype (an int8 checkpoint,
    ``spec.int8``: its int8 weights and fp32 scales, :func:`int8_tensors`). Returns every
    tensor's TensorInfo."""
    if infos is None:
        infos = file_tensor_info(weight_files(path))
    quantized = int8_tensors(spec, spec.int8_linears) if spec.int8 else {}
    for name, (dtype, shape) in quantized.items():
        info = infos.get(name)
        what = "one fp32 scale per output row" if name.endswith("_scale") else "int8 weights"
        if info is None:
            raise BlockFFNWeightError(f"{path}: weight '{name}' is missing; expected {dtype} {list(shape)} "
                                      f"({what} of a blockffn_int8 checkpoint)")
        if info.shape != shape or info.dtype != dtype:
            raise BlockFFNWeightError(f"{path}: weight '{name}' is {info.dtype} {list(info.shape)}; expected "
                                      f"{dtype} {list(shape)} ({what} of a blockffn_int8 checkpoint)")
    for name, shape in expected_shapes(spec).items():
        if name in quantized:
            continue
        info = infos.get(name)
        if info is None:
            raise BlockFFNWeightError(f"{path}: weight '{name}' is missing; expected shape {list(shape)} "
                                      f"(ffn_type={spec.ffn_type!r}, attention_type={spec.attention_type!r})")
        if info.shape != shape:
            raise BlockFFNWeightError(f"{path}: weight '{name}' has shape {list(info.shape)}; expected "
                                      f"{list(shape)} from config.json (hidden_size={spec.hidden_size}, "
                                      f"num_experts={spec.num_experts}, expert_size={spec.expert_size})")
        check_dtypes([info])
    return infos


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------


def _count_nonfinite(info: TensorInfo, rows) -> tuple[int, int]:
    """(NaN count, ±Inf count) of a tensor read through rows(i, j) → tensor[i:j], in bounded slices."""
    import torch

    if not info.shape:
        t = rows(None, None)
        return int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    per_row = 1
    for d in info.shape[1:]:
        per_row *= d
    step = max(1, SCAN_ELEMENTS // max(1, per_row))
    nan = inf = 0
    for i in range(0, info.shape[0], step):
        t = rows(i, min(info.shape[0], i + step))
        if not bool(torch.isfinite(t).all()):
            nan += int(torch.isnan(t).sum())
            inf += int(torch.isinf(t).sum())
    return nan, inf


def nonfinite_weights(infos: Mapping[str, TensorInfo], names: Iterable[str] | None = None) -> list[str]:
    """One message per tensor (of `names`, default every floating-point one) holding NaN or ±Inf.

    Reads those tensors' data, a slice of at most SCAN_ELEMENTS values at a time."""
    from safetensors import safe_open

    wanted = [infos[n] for n in (infos if names is None else names) if n in infos and infos[n].dtype in FLOAT_DTYPES]
    by_file: dict[str, list[TensorInfo]] = {}
    for info in wanted:
        by_file.setdefault(info.file, []).append(info)
    found: list[str] = []
    for file, items in by_file.items():
        if file.endswith(".safetensors"):
            with safe_open(file, framework="pt") as f:
                for info in items:
                    sl = f.get_slice(info.name)
                    counts = _count_nonfinite(info, lambda i, j, sl=sl, name=info.name:
                                              f.get_tensor(name) if i is None else sl[i:j])
                    found += _nonfinite_message(info, *counts)
        else:
            tensors = _bin_tensors(file)
            for info in items:
                t = tensors[info.name]
                found += _nonfinite_message(info, *_count_nonfinite(info, lambda i, j, t=t:
                                                                    t if i is None else t[i:j]))
    return found


def _nonfinite_message(info: TensorInfo, nan: int, inf: int) -> list[str]:
    if not nan and not inf:
        return []
    numel = 1
    for d in info.shape:
        numel *= d
    return [f"{info.file}: weight '{info.name}' has {nan} NaN and {inf} infinite values (of {numel}); "
            f"expected finite numbers"]
