"""Meta's original Llama checkpoint layout as a source: params.json, consolidated.NN.pth, tokenizer.model.

This is what `meta-llama/Llama-2-7b` (not `-hf`) holds and what Meta's download script writes. It
is read in place and given to the later stages in transformers' layout, tensor by tensor, like any
other source:

- the config comes from params.json (dim, n_layers, n_heads, n_kv_heads, multiple_of,
  ffn_dim_multiplier, norm_eps, rope_theta, vocab_size, where -1 means tokenizer.model's size);
- names map to transformers' (`layers.N.attention.wq` -> `model.layers.N.self_attn.q_proj`...);
- a model-parallel checkpoint (13B: 2 files, 70B: 8) has each matrix cut into one piece per file,
  along its output rows or, for the embeddings and the matrices that take a parallel input
  (wo, w2), along its columns; the pieces are joined back, and norms (whole in every file) read once;
- wq and wk keep Meta's interleaved RoPE row order, which transformers permutes to rotate-half
  within each head. That order is the one GGUF stores too, so the family's own GGUF -> HF row
  permutation (arch `to_hf_layout`) is the one applied here.

The .pth files are pickles: they are read with torch's weights-only unpickler (tensors and plain
containers, never code) and memory-mapped, opened per use so no tensor's pages stay mapped after it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from .errors import UsageError
from .sources import Source, check_tensors, fill_model, load_pickled_weights

PARAMS = "params.json"
SHARD = re.compile(r"^consolidated\.(\d+)\.pth$")
# Meta name (after "layers.N.") -> transformers name (after "model.layers.N."), and the dimension
# a model-parallel checkpoint cuts it along (None: whole in every file)
LAYER_NAMES = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
TOP_NAMES = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", 1),
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
}
LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
IGNORED = re.compile(r"(^|\.)rope\.freqs$")  # LLaMA 1's precomputed RoPE table: derived from the config


def is_meta_dir(path: Path) -> bool:
    """A folder in Meta's layout: params.json, and consolidated.NN.pth or no config.json (its
    parts not downloaded yet), and no transformers weights beside them (a folder holding both is
    read as the transformers checkpoint it also is)."""
    if not (path / PARAMS).is_file() or any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin")):
        return False
    return any(SHARD.match(f.name) for f in path.glob("consolidated.*.pth")) or not (path / "config.json").is_file()


def ffn_hidden_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's FeedForward width: 2/3 of 4*dim, scaled by ffn_dim_multiplier, rounded up to multiple_of."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def context_length(params: dict) -> int:
    """params.json does not say the training context for LLaMA 1/2 and Code Llama: it is told apart
    by the settings that differ between them (max_seq_len where a file has it)."""
    if params.get("max_seq_len"):
        return int(params["max_seq_len"])
    if params.get("rope_theta") == 1_000_000:
        return 16384  # Code Llama
    return 2048 if params.get("norm_eps") == 1e-6 else 4096  # LLaMA 1 : Llama 2


class MetaSource(Source):
    kind = "meta"

    def __init__(self, spec: str, path: Path):
        super().__init__(spec, path)
        self._spm = path / "tokenizer.model"
        self._shards = sorted((f for f in path.glob("consolidated.*.pth") if SHARD.match(f.name)),
                              key=lambda f: int(SHARD.match(f.name)[1]))
        numbers = [int(SHARD.match(f.name)[1]) for f in self._shards]
        if not numbers:
            raise UsageError(f"{path} has a params.json but no weights (consolidated.00.pth ...); download them too")
        if numbers != list(range(len(numbers))):
            missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
            raise UsageError(f"{path} lacks consolidated.{missing[0]:02d}.pth of its {max(numbers) + 1} parts; "
                             "the checkpoint is incomplete: download it again")
        self.config = self._config(self._read_params(), self._sentencepiece())
        self.arch  # unsupported settings fail here, before any weight is read
        self._names, self._shapes = self._read_shapes()
        check_tensors(self.arch, self.config, self._shapes, str(path), PARAMS, label=meta_name)

    # --- config ---------------------------------------------------------------------------------
    def _read_params(self) -> dict:
        f = self.path / PARAMS
        try:
            params = json.loads(f.read_text())
        except (ValueError, OSError) as e:
            raise UsageError(f"{f} is not readable JSON ({e}); download it again") from None
        if not isinstance(params, dict):
            raise UsageError(f"{f} is not a JSON object of model settings; download it again")
        missing = [k for k in ("dim", "n_layers", "n_heads", "multiple_of", "norm_eps") if k not in params]
        if missing:
            raise UsageError(f"{f} lacks {', '.join(missing)}; it is not a Llama params.json")
        if params.get("moe") or params.get("use_scaled_rope"):
            key = "moe" if params.get("moe") else "use_scaled_rope"
            raise UsageError(f"{f} sets {key}, which this reader of Meta's Llama 1/2 layout does not support; "
                             "use the transformers-layout checkpoint of the same model")
        return params

    def _sentencepiece(self):
        import sentencepiece as spm

        if not self._spm.is_file():
            raise UsageError(f"{self.path} has no tokenizer.model, which a GGUF file needs; download it with the weights")
        try:
            return spm.SentencePieceProcessor(model_file=str(self._spm))
        except Exception as e:  # noqa: BLE001 - RuntimeError for anything not a SentencePiece model
            raise UsageError(f"{self._spm} is not a SentencePiece model ({str(e).strip()[:120]}); Llama 3's tiktoken "
                             "tokenizer is not read from Meta's layout: use the transformers-layout checkpoint") from None

    def _config(self, params: dict, sp):
        from transformers import LlamaConfig

        vocab = params.get("vocab_size", -1)
        try:
            return LlamaConfig(
                vocab_size=sp.vocab_size() if vocab in (-1, None) else int(vocab),
                hidden_size=int(params["dim"]),
                intermediate_size=ffn_hidden_size(int(params["dim"]), int(params["multiple_of"]), params.get("ffn_dim_multiplier")),
                num_hidden_layers=int(params["n_layers"]),
                num_attention_heads=int(params["n_heads"]),
                num_key_value_heads=int(params.get("n_kv_heads") or params["n_heads"]),
                rms_norm_eps=float(params["norm_eps"]),
                rope_theta=float(params.get("rope_theta") or 10000.0),
                max_position_embeddings=context_length(params),
                tie_word_embeddings=False,
                bos_token_id=_id_or_none(sp.bos_id()), eos_token_id=_id_or_none(sp.eos_id()),
                pad_token_id=_id_or_none(sp.pad_id()),
                architectures=["LlamaForCausalLM"],
            )
        except (TypeError, ValueError, ZeroDivisionError) as e:
            raise UsageError(f"{self.path / PARAMS} does not make a Llama config ({e}); download it again") from None

    # --- tensors --------------------------------------------------------------------------------
    def _opened(self) -> list[dict]:
        """Every part's tensors, memory-mapped for this use only: their pages go with the tensors."""
        return [load_pickled_weights(f) for f in self._shards]

    def _read_shapes(self):
        """HF name -> (Meta name, split dimension), and HF name -> full shape, from the parts'
        headers; a name Meta's Llama has not, a non-float tensor, or parts that disagree fail here."""
        names, shapes = {}, {}
        parts = self._opened()
        for p, f in zip(parts, self._shards):
            if not isinstance(p, dict) or not all(isinstance(k, str) and hasattr(t, "dtype") for k, t in p.items()):
                raise UsageError(f"{f} does not hold a table of named tensors; it is not a Meta checkpoint part")
        first = parts[0]
        for other, f in zip(parts[1:], self._shards[1:]):
            if set(other) != set(first):
                odd = sorted(set(other) ^ set(first))[0]
                raise UsageError(f"{f} and {self._shards[0].name} hold different tensors ({odd!r}); the checkpoint is broken")
        for meta in first:
            if IGNORED.search(meta):
                continue
            hf, dim = _hf_name(meta)
            if hf is None:
                raise UsageError(f"{self._shards[0]}: tensor {meta!r} is not part of Meta's Llama layout; is this a Llama checkpoint?")
            pieces = [p[meta] for p in parts]
            if not all(t.dtype.is_floating_point for t in pieces):
                raise UsageError(f"{self.path}: tensor {meta} is stored as {pieces[0].dtype}, not as floats; "
                                 "a quantized or integer checkpoint cannot be exported: pass the float model")
            shape = list(pieces[0].shape)
            if len(pieces) > 1 and dim is not None and len(shape) == 2:
                rest = [s for i, s in enumerate(shape) if i != dim]
                if any([s for i, s in enumerate(t.shape) if i != dim] != rest for t in pieces):
                    raise UsageError(f"{self.path}: the parts of tensor {meta} have shapes that do not join; the checkpoint is broken")
                shape[dim] = sum(t.shape[dim] for t in pieces)
            names[hf], shapes[hf] = (meta, dim), tuple(shape)
        return names, shapes

    def shapes(self):
        return dict(self._shapes)

    def _joined(self, parts: list[dict], name: str, rows: slice = slice(None)):
        """Rows `rows` of a tensor, its parts joined."""
        import torch

        meta, dim = self._names[name]
        if len(parts) == 1 or dim is None:
            return parts[0][meta][rows]
        if dim == 0:
            return torch.cat([p[meta] for p in parts])[rows]
        return torch.cat([p[meta][rows] for p in parts], 1)

    def load(self, name):
        return self.arch.to_hf_layout(name, self._joined(self._opened(), name), self.config)

    def row_chunks(self, name, rows):
        if self.arch.permutes(name):  # q/k rows are in another order: whole
            yield from super().row_chunks(name, rows)
            return
        meta, dim = self._names[name]
        parts = self._opened()
        if dim == 0:  # each part holds consecutive rows
            for p in parts:
                yield from p[meta].split(rows)
            return
        for r in range(0, self._shapes[name][0], rows):
            yield self._joined(parts, name, slice(r, r + rows))

    # --- tokenizer and model ----------------------------------------------------------------------
    def tokenizer(self):
        """The SentencePiece model as transformers' Llama tokenizer, adding BOS as Meta's generation code does."""
        from transformers import LlamaTokenizer

        sp = self._sentencepiece()
        roles = {f"{role}_token": sp.id_to_piece(i) for role, i in
                 (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id())) if i >= 0}
        return LlamaTokenizer.from_pretrained(self.path, local_files_only=True, add_bos_token=True, add_eos_token=False, **roles)

    def tokenizer_fields(self):
        from .tokenizer import sentencepiece_fields

        return sentencepiece_fields(self.tokenizer(), self._spm, self.config.vocab_size)

    def load_model(self, dtype=None, device="cpu"):
        return fill_model(self.config, self.shapes(), self.load, self.arch, {}, dtype, device)


def _hf_name(meta: str) -> tuple[str | None, int | None]:
    m = LAYER.match(meta)
    if m:
        hf, dim = LAYER_NAMES.get(m[2], (None, None))
        return (None if hf is None else f"model.layers.{m[1]}.{hf}"), dim
    return TOP_NAMES.get(meta, (None, None))


def meta_name(hf: str) -> str:
    """The Meta name of a transformers tensor name (for messages; the name itself where Meta has none)."""
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", hf)
    table = LAYER_NAMES if m else TOP_NAMES
    for meta, (theirs, _) in table.items():
        if theirs == (m[2] if m else hf):
            return f"layers.{m[1]}.{meta}" if m else meta
    return hf


def _id_or_none(i: int) -> int | None:
    return i if i >= 0 else None
