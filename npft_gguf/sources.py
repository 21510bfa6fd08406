"""Model sources: a hub id, a local Hugging Face directory, a .gguf file, or a built-in demo name.

Every source offers the same small API, so the stages after it never ask where a model came
from: the HF config and its architecture entry, tensor names and shapes in HF layout, one tensor
at a time as float (for streaming export), the tokenizer (HF object and GGUF fields), and the
whole model as a torch module (for tuning and evaluation).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import cached_property
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from . import demo
from . import arch as families
from .arch import Family
from .errors import NpftError, UsageError
from .tokenizer import Field, bpe_fields, fix_pre_tokenizer, gguf_fields, gguf_tokenizer_problem, sentencepiece_fields

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
INTEGER_TYPES = {GGMLQuantizationType.I8, GGMLQuantizationType.I16, GGMLQuantizationType.I32, GGMLQuantizationType.I64}
SKIPPED = re.compile(r"rotary_emb\.inv_freq$")
# what AutoTokenizer can build an exportable (fast) tokenizer from: any one of these sets
TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))


class Source:
    """Common face of every source. Subclasses fill config, tensor shapes and loading."""

    kind = "?"

    def __init__(self, spec: str, path: Path):
        self.spec, self.path = spec, path

    config = None  # transformers PretrainedConfig, or for GGUF sources a plain namespace of the same names

    @cached_property
    def arch(self) -> Family:
        """The model's family (arch/): unsupported families and features fail here."""
        return families.for_config(self.config)

    def extra_tensors(self) -> dict[str, np.ndarray]:
        """GGUF tensors with no HF parameter (llama3's rope_freqs), by GGUF name."""
        return self.arch.extra_tensors(self.config)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """HF tensor name -> shape, in the order they should be written."""
        raise NotImplementedError

    def load(self, name: str) -> "torch.Tensor":
        """One tensor, HF layout, in its stored float dtype (quantized GGUF tensors: float32)."""
        raise NotImplementedError

    def row_chunks(self, name: str, rows: int) -> Iterator["torch.Tensor"]:
        """A 2-D tensor as `load` gives it, `rows` rows at a time. This default loads it whole;
        sources that can read part of a tensor override it, so a large one is never whole in memory."""
        yield from self.load(name).split(rows)

    def tokenizer(self):
        raise NotImplementedError

    def tokenizer_fields(self) -> list[Field]:
        raise NotImplementedError

    def load_model(self, dtype=None, device="cpu"):
        """The whole model as a transformers module (float32 unless `dtype` says otherwise)."""
        raise NotImplementedError

    def skeleton(self, dtype=None):
        """The model `load_model` gives, on the meta device: its modules and shapes, no weights read
        and no memory taken (a process that receives its share of the weights from rank 0:
        distributed.load)."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(self.config, dtype=dtype or torch.float32).eval()

    def describe(self) -> str:
        return f"{self.spec} ({self.kind})"


# ---------------------------------------------------------------------------------------------
class HFDirSource(Source):
    kind = "hf"

    def __init__(self, spec: str, path: Path):
        super().__init__(spec, path)
        from transformers import AutoConfig

        if not (path / "config.json").is_file():
            raise UsageError(f"{path} holds no config.json: it is not a Hugging Face model directory")
        check_config_json(path / "config.json")
        try:
            self.config = AutoConfig.from_pretrained(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds
            raise UsageError(f"{path}/config.json cannot be read as a model config ({_first_line(e)})") from None
        inner = families.unwrap(self.config)  # a multimodal checkpoint: its text model
        self._prefix = None
        if inner is not None:
            self.config, self._prefix = inner
        classes = getattr(self.config, "architectures", None) or []
        if classes and not any(c.endswith(("ForCausalLM", "LMHeadModel")) for c in classes):
            raise UsageError(f"{path} holds a {classes[0]}, not a causal language model")
        self.arch  # unsupported architectures fail here, before any work
        self._files = self._text_model(self._weight_files())
        self._shapes = self._read_shapes()  # headers only: non-float weights fail here
        check_tensors(self.arch, self.config, self._shapes, str(path), "config.json")
        if not any(all((path / f).is_file() for f in group) for group in TOKENIZER_FILES):
            raise UsageError(f"{path} has no tokenizer files (tokenizer.json or tokenizer.model), which a GGUF file needs; "
                             "copy them from the model this checkpoint came from")
        self.tokenizer()  # read now (every command needs it): broken tokenizer files fail here, before any work

    def _text_model(self, files: dict[str, Path]) -> dict[str, Path]:
        """For a multimodal checkpoint, its text model's tensors under their text-model names
        ('model.language_model.layers.0...' -> 'model.layers.0...'); the others are left out."""
        self._stored = {}
        if self._prefix is None:
            return files
        out = {}
        for name, f in files.items():
            prefix = next((p for p in self._prefix if name.startswith(p)), None)
            if prefix is not None:
                text = "model." + name[len(prefix):]
                out[text], self._stored[text] = f, name
            elif name in ("lm_head.weight", "language_model.lm_head.weight"):
                out["lm_head.weight"], self._stored["lm_head.weight"] = f, name
        return out

    def _weight_files(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                return {k: self.path / v for k, v in json.loads(index.read_text())["weight_map"].items()}
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise UsageError(f"{index} is not a readable safetensors index ({_first_line(e)}); download it again") from None
        files = sorted(self.path.glob("*.safetensors")) or sorted(self.path.glob("pytorch_model*.bin"))
        if not files:
            raise UsageError(f"{self.path} has a config but no weights (*.safetensors or pytorch_model*.bin)")
        out = {}
        for f in files:
            with self._handle(f) as h:
                out.update((k, f) for k in h.keys())
        return out

    @contextmanager
    def _handle(self, f: Path):
        """A safetensors handle, opened for this use only: tensors read through it are views of the
        mapped file, and every page they touched stays resident while the handle lives, so one
        handle kept open for a whole export would end up holding the whole model in memory.
        (A tensor outlives its handle; its pages go when it does.) pytorch_model*.bin files are
        loaded once, memory-mapped."""
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                handle = safe_open(str(f), framework="pt")
            except Exception as e:  # noqa: BLE001 - SafetensorError, OSError...
                raise _unreadable_weights(f, e) from None
            with handle as h:
                yield h
            return
        cache = self.__dict__.setdefault("_bins", {})
        if f not in cache:
            cache[f] = load_pickled_weights(f)
        yield cache[f]

    def _read_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF name -> shape, from the file headers; a tensor stored as integers is refused here."""
        out = {}
        tied = getattr(self.config, "tie_word_embeddings", False)
        with ExitStack() as stack:
            handles = {f: stack.enter_context(self._handle(f)) for f in set(self._files.values())}
            for name, f in self._files.items():
                if SKIPPED.search(name) or (tied and name == "lm_head.weight"):
                    continue
                if self.arch.gguf_name(name) is None:
                    raise UsageError(f"tensor {name!r} has no GGUF name in the {self.arch.name} table; is this really a {self.arch.name} model?")
                h = handles[f]
                if hasattr(h, "get_slice"):
                    try:
                        part = h.get_slice(self._stored.get(name, name))
                    except Exception as e:  # noqa: BLE001 - an index naming a tensor its shard lacks
                        raise UsageError(f"{f} holds no tensor {name!r} ({_first_line(e)}); the checkpoint is incomplete") from None
                    shape, dtype = tuple(part.get_shape()), part.get_dtype()
                    is_float = dtype.startswith("F") or dtype == "BF16"
                else:
                    t = h[self._stored.get(name, name)]
                    shape, dtype, is_float = tuple(t.shape), str(t.dtype).removeprefix("torch."), t.dtype.is_floating_point
                if not is_float:
                    raise UsageError(f"{self.path}: tensor {name} is stored as {dtype}, not as floats; a quantized or "
                                     "integer checkpoint cannot be exported: pass the float model")
                out[name] = shape
        return out

    def shapes(self):
        return dict(self._shapes)

    def load(self, name):
        stored = self._stored.get(name, name)
        with self._handle(self._files[name]) as h:
            return h.get_tensor(stored) if hasattr(h, "get_tensor") else h[stored]

    def row_chunks(self, name, rows):
        f = self._files[name]
        if f.suffix != ".safetensors":
            yield from super().row_chunks(name, rows)
            return
        with self._handle(f) as h:
            n = h.get_slice(self._stored.get(name, name)).get_shape()[0]
        step = rows * 16  # a handle per 16 chunks (opening one costs about 0.3 ms), so their pages go with them
        for r in range(0, n, step):
            with self._handle(f) as h:
                block = h.get_slice(self._stored.get(name, name))[r : r + step]
            yield from block.split(rows)

    def tokenizer(self):
        return self._tokenizer

    @cached_property
    def _tokenizer(self):
        """The HF tokenizer, read once; files it cannot be built from, or that hold no vocabulary,
        are refused by name."""
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - JSONDecodeError, the tokenizers library's Exception, OSError...
            raise UsageError(f"{self.path}: its tokenizer files cannot be read ({_first_line(e)}); are they truncated? "
                             "copy them again from the model this checkpoint came from") from None
        if tok.vocab_size == 0:  # its special tokens alone: every text tokenizes to nothing
            raise UsageError(f"{self.path}: its tokenizer has an empty vocabulary; copy the tokenizer files of the "
                             "model this checkpoint came from")
        return tok

    def tokenizer_fields(self):
        tok = self.tokenizer()
        n_vocab = self.config.vocab_size
        spm = self.path / "tokenizer.model"
        if spm.is_file():
            return sentencepiece_fields(tok, spm, n_vocab)
        if not hasattr(tok, "backend_tokenizer"):
            raise UsageError(f"{self.path} has no tokenizer.json or tokenizer.model that can be exported")
        return bpe_fields(tok, n_vocab)

    def load_model(self, dtype=None, device="cpu"):
        import torch
        from transformers import AutoModelForCausalLM

        if self._prefix is not None:  # the text model alone, filled from the multimodal checkpoint
            return fill_model(self.config, self.shapes(), self.load, self.arch, {}, dtype, device)
        return AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype or torch.float32, local_files_only=True).to(device).eval()


# ---------------------------------------------------------------------------------------------
class GGUFSource(Source):
    """A .gguf file: its header read once (gguf_header), each tensor read from the file when asked
    for and dequantized to float32, whole or in row chunks; nothing of the file stays mapped."""

    kind = "gguf"

    def __init__(self, spec: str, path: Path):
        super().__init__(spec, path)
        self.header = read_gguf_header(path)
        arch_name = self.meta("general.architecture")
        self._arch = families.for_gguf(arch_name)
        for t in self.header.tensors:
            if t.type in INTEGER_TYPES:
                raise UsageError(f"{path}: tensor {t.name!r} holds integers ({t.type.name}), not weights that can be read as floats")
        from .gguf_header import check_dequantizable

        check_dequantizable(path, self.header.tensors)  # F64, Q8_1, Q8_K...: before any work, not mid-export
        self._check_metadata()
        self._extras = {t.name: t for t in self.header.tensors if self._arch.passthrough(t.name)}
        self._extra_data = self._read_extras()  # small (one value per RoPE frequency): read once
        self.config = self._hf_config(self._arch.config_from_extras(self._config_kwargs(), self.extra_tensors()))
        self._arch.check_config(self.config)
        names = self._arch.hf_names(self.config)
        self._tensors = {}
        for t in self.header.tensors:
            if t.name in self._extras:
                continue
            hf = names.get(t.name)
            if hf is None:
                raise UsageError(f"{path}: tensor {t.name!r} is not part of a {arch_name} model as transformers builds it; "
                                 "the file is not one this tool can read")
            self._tensors[hf] = t
        check_tensors(self._arch, self.config, self.shapes(), str(path), "its metadata")

    @property
    def arch(self):
        return self._arch

    def _check_metadata(self) -> None:
        """The header's tokenizer and hyperparameters, before anything is built from them: a file
        llama.cpp could not load (no tokenizer) or one that would fail deep inside transformers
        (a zero head count) is refused in one line naming the file and the key."""
        tokenizer = gguf_tokenizer_problem(self.header.fields)
        if tokenizer:
            raise UsageError(f"{self.path}: {tokenizer}; llama.cpp cannot load such a file, so nothing is made from it "
                             "(export the Hugging Face model, which has the tokenizer files)")
        hparams = self._arch.metadata_problem(self.meta)
        if hparams:
            raise UsageError(f"{self.path}: its metadata is broken: {hparams}")

    def meta(self, key: str, default=None):
        f = self.header.fields.get(key)
        return default if f is None else f.value

    def hf_config(self):
        """The transformers config (a PretrainedConfig), for building the model."""
        return self.config

    @staticmethod
    def _hf_config(kw: dict):
        from transformers import AutoConfig

        try:
            return AutoConfig.for_model(**kw)
        except Exception as e:  # noqa: BLE001 - ValueError, TypeError, KeyError, ArithmeticError...
            raise UsageError(f"the metadata of this GGUF file does not make a {kw.get('model_type')} config ({_first_line(e)})") from None

    def _config_kwargs(self) -> dict:
        kw = self._arch.config_kwargs(self.meta)
        if kw.get("vocab_size") is None:
            kw["vocab_size"] = len(self.meta("tokenizer.ggml.tokens") or ())
        kw["tie_word_embeddings"] = all(t.name != "output.weight" for t in self.header.tensors)
        for role in ("bos", "eos", "padding"):  # the file's, not the family config's defaults (phi3: pad 32000)
            tid = self.meta(f"tokenizer.ggml.{role}_token_id")
            kw[{"padding": "pad"}.get(role, role) + "_token_id"] = None if tid is None else int(tid)
        return kw

    def shapes(self):
        return {hf: t.shape for hf, t in self._tensors.items()}

    def load(self, name):
        (w,) = self._stored_rows(name)
        return self._arch.to_hf_layout(name, w.reshape(self._tensors[name].shape), self.config)

    def extra_tensors(self):
        """The file's own tensors that have no HF parameter (rope_freqs), carried over as they are."""
        return dict(self._extra_data)

    def _read_extras(self) -> dict[str, np.ndarray]:
        out = {}
        for name, t in self._extras.items():
            (w,) = self._stored_rows(name, table=self._extras)
            out[name] = w.reshape(t.shape).numpy()
        return out

    def row_chunks(self, name, rows):
        if self._arch.permutes(name):  # the stored row order is not HF's
            return super().row_chunks(name, rows)
        return self._stored_rows(name, rows)

    def _stored_rows(self, name: str, rows: int | None = None, table=None) -> Iterator["torch.Tensor"]:
        """The tensor in its stored row order, float32, `rows` rows at a time (default: all at once),
        read from the file as it goes, so each chunk's bytes are freed with it."""
        import torch
        from gguf.quants import dequantize

        t = (table or self._tensors)[name]
        nrows = math.prod(t.shape[:-1])
        row_bytes = t.n_bytes // nrows
        with open(self.path, "rb") as f:
            f.seek(t.data_offset)
            for r in range(0, nrows, rows or nrows):
                n = min(rows or nrows, nrows - r)
                raw = np.fromfile(f, np.uint8, n * row_bytes).reshape(n, row_bytes)
                yield torch.from_numpy(dequantize(raw, t.type).astype(np.float32, copy=False))

    def tokenizer(self):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name)
        except Exception as e:  # noqa: BLE001 - transformers' GGUF reader raises many kinds
            raise UsageError(f"{self.path}: transformers cannot build a tokenizer from its metadata ({_first_line(e)})") from None
        fix_pre_tokenizer(tok, self.meta("tokenizer.ggml.pre", ""))
        return tok

    def tokenizer_fields(self):
        return gguf_fields(self.header.fields)

    def load_model(self, dtype=None, device="cpu"):
        """Build the HF model uninitialised, then fill it one tensor at a time (one copy in memory)."""
        return fill_model(self.config, self._tensors, self.load, self._arch, self.extra_tensors(), dtype, device)


def fill_model(config, names, load, family, extras: dict, dtype=None, device="cpu"):
    """The transformers model of `config`, built uninitialised and filled one tensor at a time
    (`load(name)`), so only one copy of the weights is ever in memory."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    params = dict(model.named_parameters())
    for name in names:
        with torch.no_grad():
            params[name].copy_(load(name))
    if config.tie_word_embeddings:
        model.tie_weights()
    family.apply_extra_tensors(model, extras)
    return model.to(device).eval()


def check_config_json(path: Path) -> None:
    """config.json as plain JSON, its counts and sizes checked (arch.config_problem) before
    transformers builds the config and divides by them."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON ({_first_line(e)}); is it truncated? download it again") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path} holds a JSON {type(config).__name__}, not a model config")
    why = families.config_problem(config)
    if why:
        raise UsageError(f"{path}: {why}; the config is broken")


def read_gguf_header(path: Path):
    """gguf_header.read_header, with one-line errors for files that are not complete GGUF files."""
    from .gguf_header import read_header

    try:
        header = read_header(path)
    except Exception as e:  # noqa: BLE001 - ValueError, struct.error, UnicodeDecodeError, OSError...
        raise _unreadable(path, e) from None
    _check_complete(path, header.tensors)
    return header


def load_pickled_weights(f: Path) -> dict:
    """A torch pickle of weights (pytorch_model*.bin, consolidated.NN.pth), memory-mapped, read with
    torch's weights-only unpickler: tensors and plain containers, never code a crafted file names."""
    import torch

    try:
        return torch.load(f, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - RuntimeError, EOFError, pickle errors...
        raise _unreadable_weights(f, e) from None


def _unreadable_weights(f: Path, e: BaseException) -> UsageError:
    if isinstance(e, FileNotFoundError):
        return UsageError(f"{f} is missing (the index names it); the checkpoint is incomplete: download it again")
    return UsageError(f"{f} is not a readable weights file ({_first_line(e)}); is it truncated or corrupt? download it again")


def _unreadable(path: Path, e: BaseException) -> UsageError:
    return UsageError(f"{path} is not a readable GGUF file ({_first_line(e)}); is it truncated or corrupt?")


def _check_complete(path: Path, tensors) -> None:
    size = path.stat().st_size
    for t in tensors:
        if t.data_offset + t.n_bytes > size:
            raise UsageError(f"{path} ends before the data of tensor {t.name!r}: the file is truncated; fetch it again")


# --- what the config says every tensor's shape must be (llama.cpp's loader checks the same) ------
CONFIG_DIMS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")
BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def check_tensors(arch: Family, config, shapes: dict[str, tuple[int, ...]], where: str, config_name: str = "the config",
                  label=str) -> None:
    """Refuse, from shapes alone and before any work, what would make a GGUF file llama.cpp
    cannot load: a zero-sized dimension, a shape the config disagrees with, a layer the config
    does not have, a missing tensor. Messages name a tensor by `label(HF name)`: as the checkpoint does."""
    for name, shape in shapes.items():
        if 0 in tuple(shape):
            raise UsageError(f"{where}: tensor {label(name)} has a zero-sized dimension (shape {tuple(shape)}); the checkpoint is broken")
    try:
        expected = arch.expected_shapes(config)
    except (AttributeError, TypeError):  # a config without the sizes: llama.cpp's loader will say
        return
    n_layer = config.num_hidden_layers
    present = set()
    for name, shape in shapes.items():
        gguf = arch.gguf_name(name)
        m = BLOCK.match(gguf or "")
        if m and int(m[1]) >= n_layer:
            raise UsageError(f"{where}: tensor {label(name)} belongs to layer {m[1]}, but {config_name} says num_hidden_layers {n_layer}")
        want = expected.get(f"blk.{{i}}.{m[2]}" if m else gguf)
        if want is not None and tuple(shape) != want:
            dims = ", ".join(f"{k} {getattr(config, k)}" for k in CONFIG_DIMS if getattr(config, k, None) is not None)
            raise UsageError(f"{where}: tensor {label(name)} has shape {tuple(shape)}, but {config_name} ({dims}) makes it {want}; "
                             "the weights and the config disagree")
        present.add(gguf)
    for key in expected:
        for gguf in ([key.replace("{i}", str(i)) for i in range(n_layer)] if "{i}" in key else [key]):
            if gguf not in present and key not in arch.optional:
                raise UsageError(f"{where}: tensor {label(_hf_name(arch, config, gguf))} is missing ({config_name} says {n_layer} layers); "
                                 "the checkpoint is incomplete")


def _hf_name(arch: Family, config, gguf: str) -> str:
    """The HF name of a GGUF tensor, for messages (the GGUF name where the config cannot say)."""
    try:
        return arch.hf_names(config).get(gguf, gguf)
    except Exception:  # noqa: BLE001 - a config transformers cannot build: the GGUF name still says it
        return gguf


# ---------------------------------------------------------------------------------------------
def open_source(spec: str) -> Source:
    """Resolve what the user typed into a Source, or fail with a one-line message."""
    path = demo.resolve(spec)
    if path.is_file():
        from .validate.models import is_gguf

        if not is_gguf(path):  # by its magic, whatever the suffix (.GGUF, .bin as llama.cpp users name them)
            raise UsageError(f"{spec} is a file but not a GGUF file; pass a GGUF file or a Hugging Face model directory")
        return GGUFSource(spec, path)
    if path.is_dir():
        return _open_dir(spec, path)
    if HUB_ID.match(spec) and not spec.endswith(".gguf"):
        return _open_dir(spec, _from_hub(spec))
    raise UsageError(
        f"{spec}: no such file or directory; pass a .gguf file, a Hugging Face model directory, a folder in "
        f"Meta's layout (params.json, consolidated.NN.pth), a hub id like meta-llama/Llama-2-7b, or a demo name "
        f"({', '.join(demo.DEMOS)})"
    )


def _open_dir(spec: str, path: Path) -> Source:
    from .meta_layout import MetaSource, is_meta_dir

    return MetaSource(spec, path) if is_meta_dir(path) else HFDirSource(spec, path)


# a transformers checkpoint's files, and Meta's original layout's (meta-llama/Llama-2-7b); a repository
# holding both keeps Meta's in a subfolder (original/), which these patterns leave out
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "consolidated.*.pth"]


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import errors, snapshot_download

    page = f"https://huggingface.co/{repo_id}"
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except errors.GatedRepoError:
        raise NpftError(f"{repo_id} is gated: accept its licence on {page} with your account, then run `hf auth login` "
                        "(or set HF_TOKEN) and try again") from None
    except errors.RepositoryNotFoundError:
        raise NpftError(f"{repo_id} is not on the Hugging Face Hub, or is private or gated and this machine is not logged "
                        f"in: check the name on {page}, accept the licence there if it asks, and run `hf auth login`") from None
    except Exception as e:  # noqa: BLE001 - offline, unreachable, a broken cache...
        raise NpftError(
            f"could not fetch {repo_id!r} from the Hugging Face Hub ({_first_line(e)}); check the network and that HF_HUB_OFFLINE "
            f"is not set; if it is gated accept the licence on {page} and run `hf auth login`; or download it where "
            "the hub is reachable and pass its local folder"
        ) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


# ---------------------------------------------------------------------------------------------
class ModelSource(Source):
    """A model in memory (after tuning or GPTQ), with the tokenizer and metadata of the source it
    came from, so the writer streams it like any other source and the file keeps the original
    tokenizer fields byte for byte."""

    kind = "memory"

    def __init__(self, base: Source, model, label: str):
        super().__init__(base.spec, base.path)
        self.base, self.model, self.label = base, model, label
        self.config = base.config
        self._params = model.state_dict(keep_vars=True)

    @property
    def arch(self):
        return self.base.arch

    def extra_tensors(self):
        return self.base.extra_tensors()

    def shapes(self):
        return self.base.shapes()

    def load(self, name):
        return self._params[name].detach().to("cpu", copy=True)

    def tokenizer(self):
        return self.base.tokenizer()

    def tokenizer_fields(self):
        return self.base.tokenizer_fields()

    def load_model(self, dtype=None, device="cpu"):
        return self.model

    def describe(self) -> str:
        return f"{self.label} ({self.base.describe()})"
