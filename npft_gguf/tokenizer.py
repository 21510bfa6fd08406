"""Tokenizers into GGUF metadata, and the GGUF pre-tokenizer names back into HF tokenizers.

llama.cpp splits text before BPE by a named regex set (`tokenizer.ggml.pre`); it must be the
one the HF tokenizer uses, or the two tokenize differently. PRE_TOKENIZERS is the single table:
it names each known HF pre-tokenizer by llama.cpp's name, for export, and rebuilds the HF
pre-tokenizer from the name, for tokenizers that transformers reconstructs from a GGUF file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFValueType as V
from gguf import TokenType
from tokenizers import Regex, pre_tokenizers

from .errors import UsageError

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(use_regex: bool):
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


def _split(pattern: str):
    return pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)


# llama.cpp's tokenizer.ggml.pre name -> builder of the HF pre-tokenizer that splits the same way
PRE_TOKENIZERS = {
    "gpt-2": lambda: _byte_level(True),
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level(True)]),
    "llama-bpe": lambda: pre_tokenizers.Sequence([_split(LLAMA3_SPLIT), _byte_level(False)]),
    "qwen2": lambda: pre_tokenizers.Sequence([_split(QWEN2_SPLIT), _byte_level(False)]),
}


def _signature(state) -> str:
    """Canonical JSON of a pre-tokenizer config, without options that do not change the split."""

    def clean(node):
        if isinstance(node, dict):
            return {k: clean(v) for k, v in sorted(node.items()) if k not in ("trim_offsets",)}
        if isinstance(node, list):
            return [clean(v) for v in node]
        return node

    if isinstance(state, (bytes, str)):
        state = json.loads(state)
    return json.dumps(clean(state), sort_keys=True)


def pre_name(pre_tokenizer_state) -> str:
    """llama.cpp's name for an HF pre-tokenizer config, or a UsageError for an unknown one."""
    sig = _signature(pre_tokenizer_state)
    for name, build in PRE_TOKENIZERS.items():
        if _signature(build().__getstate__()) == sig:
            return name
    raise UsageError(
        "this BPE tokenizer's pre-tokenizer is not one llama.cpp is known to split the same way "
        f"(known: {', '.join(PRE_TOKENIZERS)}); export would tokenize differently, so it is refused"
    )


def fix_pre_tokenizer(tokenizer, name: str) -> None:
    """Give a tokenizer rebuilt from a GGUF file the pre-tokenizer its `tokenizer.ggml.pre` names."""
    if name in PRE_TOKENIZERS and hasattr(tokenizer, "backend_tokenizer"):
        tokenizer.backend_tokenizer.pre_tokenizer = PRE_TOKENIZERS[name]()


# ---------------------------------------------------------------------------------------------
# HF tokenizer -> GGUF key/values


@dataclass
class Field:
    key: str
    value: object
    vtype: V
    sub_type: V | None = None


# HF tokenizer role -> its name in GGUF's tokenizer.ggml.<name>_token_id (llama.cpp's spelling)
SPECIAL_ROLES = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding", "sep": "seperator"}


def _ids_of_special(tokenizer) -> dict[str, int]:
    out = {}
    for role, key in SPECIAL_ROLES.items():
        tid = getattr(tokenizer, f"{role}_token_id", None)
        if tid is not None:
            out[f"tokenizer.ggml.{key}_token_id"] = int(tid)
    return out


def _adds(tokenizer) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS, read off the tokenizer's behaviour rather than its flags."""
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return (bos is not None and ids[:1] == [bos]), (eos is not None and len(ids) > 1 and ids[-1:] == [eos])


def _common(tokenizer) -> list[Field]:
    fields = [Field(k, v, V.UINT32) for k, v in _ids_of_special(tokenizer).items()]
    add_bos, add_eos = _adds(tokenizer)
    fields += [Field("tokenizer.ggml.add_bos_token", add_bos, V.BOOL), Field("tokenizer.ggml.add_eos_token", add_eos, V.BOOL)]
    if getattr(tokenizer, "chat_template", None):
        fields.append(Field("tokenizer.chat_template", str(tokenizer.chat_template), V.STRING))
    return fields


def pad_piece(token_id: int) -> str:
    """The piece of an id with no token (an embedding row past the tokenizer), as GGUF files name it."""
    return f"[PAD{token_id}]"


def _vocab_table(id_to_token: dict[int, str], n_vocab: int, special: set[int], added: set[int]):
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in id_to_token:
            tokens.append(pad_piece(i))
            types.append(TokenType.UNUSED)
            continue
        tokens.append(id_to_token[i])
        types.append(TokenType.CONTROL if i in special else TokenType.USER_DEFINED if i in added else TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def bpe_fields(tokenizer, n_vocab: int) -> list[Field]:
    """A byte-level BPE tokenizer (tokenizer.json) as llama.cpp's "gpt2" tokenizer model."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state.get("model", {})
    if model.get("type") != "BPE":
        raise UsageError(f"tokenizer model {model.get('type')!r} is not supported; supported: byte-level BPE, SentencePiece")
    pre = pre_name(state.get("pre_tokenizer") or {})
    added = {t["id"]: t for t in state.get("added_tokens", [])}
    id_to_token = {i: t for t, i in tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True).items()}
    tokens, types = _vocab_table(id_to_token, n_vocab, {i for i, t in added.items() if t.get("special")}, set(added))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return [
        Field("tokenizer.ggml.model", "gpt2", V.STRING),
        Field("tokenizer.ggml.pre", pre, V.STRING),
        Field("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
        Field("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
        Field("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING),
    ] + _common(tokenizer)


def sentencepiece_fields(tokenizer, model_file: Path, n_vocab: int) -> list[Field]:
    """A SentencePiece model (tokenizer.model) as llama.cpp's "llama" tokenizer model."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    proto = pb.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        kind = (
            TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i)
            else TokenType.UNUSED if sp.is_unused(i) else TokenType.BYTE if sp.is_byte(i) else TokenType.NORMAL
        )
        types.append(int(kind))
    extra = {i: t for t, i in tokenizer.get_vocab().items() if i >= len(tokens)}
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i in range(len(tokens), n_vocab):
        tokens.append(extra.get(i, pad_piece(i)))
        scores.append(-1000.0)
        types.append(int(TokenType.UNUSED if i not in extra else TokenType.CONTROL if i in special else TokenType.USER_DEFINED))
    return [
        Field("tokenizer.ggml.model", "llama", V.STRING),
        Field("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
        Field("tokenizer.ggml.scores", scores, V.ARRAY, V.FLOAT32),
        Field("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
        Field("tokenizer.ggml.add_space_prefix", bool(proto.normalizer_spec.add_dummy_prefix), V.BOOL),
    ] + _common(tokenizer)


def gguf_tokenizer_problem(fields) -> str | None:
    """What a GGUF file's tokenizer metadata lacks that llama.cpp needs to load the file (its
    tokenizer model, a non-empty token list, a BPE's merges, per-token arrays of the list's length,
    integer special-token ids), read from the header (gguf_header values by key); None: nothing."""
    def value(key):
        f = fields.get(key)
        return None if f is None else f.value

    model = value("tokenizer.ggml.model")
    if model is None:
        return "it holds no tokenizer (tokenizer.ggml.model is missing)"
    if not isinstance(model, str) or model in ("none", "no_vocab"):
        return f"its tokenizer.ggml.model is {model!r}, not a tokenizer"
    tokens = value("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        return "it holds no token list (tokenizer.ggml.tokens is missing, empty or not strings)"
    if model == "gpt2" and not isinstance(value("tokenizer.ggml.merges"), list):
        return "its BPE tokenizer has no merges (tokenizer.ggml.merges is missing)"
    for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        per_token = value(key)
        if per_token is not None and (not isinstance(per_token, list) or len(per_token) != len(tokens)):
            n = len(per_token) if isinstance(per_token, list) else "no"
            return f"its {key} has {n} entries for {len(tokens)} tokens"
    for role in SPECIAL_ROLES.values():
        tid = value(f"tokenizer.ggml.{role}_token_id")
        if tid is not None and (isinstance(tid, bool) or not isinstance(tid, int) or tid < 0):
            return f"its tokenizer.ggml.{role}_token_id is {tid!r}, not a token id"
    pre = value("tokenizer.ggml.pre")
    if pre is not None and not isinstance(pre, str):
        return f"its tokenizer.ggml.pre is {pre!r}, not a name"
    return None


def gguf_fields(fields) -> list[Field]:
    """The tokenizer.* fields of a GGUF source (gguf_header values by key), copied as they are."""
    return [Field(k, f.value, f.type, f.sub_type) for k, f in fields.items() if k.startswith("tokenizer.")]
