"""The one place that says what each tensor of a GGUF file is written as, and by which rule: per
tensor, llama.cpp's own choice for a file type of the registry (choices.FILE_TYPES; llama-quant.cpp's
llama_tensor_get_type restated as a table), so that `export --type T [--imatrix F]` writes what
`llama-quantize [--imatrix F] T` writes (its bytes come from llama.cpp's quantizer itself,
llamacpp.GgmlQuantizer); and the rule the tuning noise meets for that tensor (tuning_rule). The
writer, imatrix.tuning_quantizers and the baselines ask it.

A file type has a base tensor type. Without --pure, llama.cpp then gives the output matrix (or
the token embedding tied to it) Q6_K, or Q8_0 when its rows do not fit the base's blocks; and
its mixes give some attention-value and feed-forward-down layers more bits (RULES below; the
_M mixes on llama.cpp's use-more-bits layers). Last, a tensor whose rows do not fit its type's
blocks falls back (FALLBACK), to F16 when even that does not fit. Only 2-D weights are quantized.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from ..choices import EXPORT_TYPES, FILE_TYPES, FileType, canonical_type

FLOATS = ("f32", "f16", "bf16")
EXACT_RTN = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", *FLOATS)  # llama.cpp rounds these to nearest without an imatrix
APPROXIMATED = ("q2_k", "q3_k")  # as the tuned base type, the noise's RTN grid (no twin yet; Q4_K..Q6_K have one)


def file_type(name: str) -> FileType:
    """The registry entry (choices.FILE_TYPES) for a --type value; a UsageError lists the known ones."""
    from ..errors import UsageError

    key = canonical_type(name)
    if key is None:
        raise UsageError(f"unknown file type {name!r}; choose one of: {', '.join(EXPORT_TYPES)}")
    return FILE_TYPES[key]


def llama_ftype(name: str):
    """gguf's LlamaFileType of a file type (its general.file_type)."""
    from gguf import LlamaFileType

    ft = file_type(name).name
    return LlamaFileType.ALL_F32 if ft == "f32" else LlamaFileType[f"MOSTLY_{ft.upper()}"]


@dataclass(frozen=True)
class Choice:
    type: str       # the tensor type written, "q4_k"
    note: str = ""  # why it differs from the file type's base, for the warning and the report

    @property
    def grid(self):
        """Our torch grid of that type (encode/fakequant), for the tuning; None where there is none (iq4_xs)."""
        from . import GRIDS

        return GRIDS.get(self.type)

    @property
    def block(self) -> int:
        return _sizes(self.type)[0]

    @property
    def block_bytes(self) -> int:
        return _sizes(self.type)[1]

    @property
    def ggml(self):
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType[self.type.upper()]


def _sizes(type_name: str) -> tuple[int, int]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name.upper()]]


def fits(type_name: str, ncols: int) -> bool:
    return ncols % _sizes(type_name)[0] == 0


@dataclass(frozen=True)
class ModelShape:
    """The facts of a model that llama.cpp's per-tensor choice depends on."""
    n_layer: int
    n_gqa: int
    tied: bool           # no output.weight: the token embedding is the output matrix
    llama_70b: bool = False  # llama.cpp's LLM_TYPE_70B (llama, 80 layers, grouped KV heads)

    @classmethod
    def of(cls, config, arch_name: str = "") -> "ModelShape":
        heads = config.num_attention_heads
        gqa = heads // (getattr(config, "num_key_value_heads", None) or heads)
        n_layer = config.num_hidden_layers
        return cls(n_layer=n_layer, n_gqa=gqa, tied=bool(getattr(config, "tie_word_embeddings", False)),
                   llama_70b=arch_name == "llama" and n_layer == 80 and gqa > 1)


# --- llama.cpp's mixes as a table ---------------------------------------------------------------------


def more_bits(i: int, n: int) -> bool:
    """llama.cpp's use-more-bits layers: the first and last eighth, and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class Facts:
    """What a rule looks at. llama.cpp counts attn_v and ffn_down tensors in its tensor order, which
    is by layer, out of n_layer (one of each per layer in a dense model): the layer index here."""
    layer: int
    model: ModelShape
    imatrix: bool


Rule = tuple[tuple[str, ...], Callable[[Facts], bool], str]  # (file types, when, tensor type)
ALWAYS = lambda f: True  # noqa: E731

# per tensor category, llama.cpp's rules in its order; the first whose file type and condition hold wins
RULES: dict[str, list[Rule]] = {
    "attn_v": [
        (("q2_k",), lambda f: f.model.n_gqa >= 4, "q4_k"),
        (("q2_k",), ALWAYS, "q3_k"),
        (("q3_k_m",), lambda f: f.layer < 2, "q5_k"),
        (("q3_k_m",), ALWAYS, "q4_k"),
        (("q3_k_l",), ALWAYS, "q5_k"),
        (("iq4_nl", "iq4_xs"), lambda f: f.model.n_gqa >= 4, "q5_k"),
        (("q4_k_m", "q5_k_m"), lambda f: more_bits(f.layer, f.model.n_layer), "q6_k"),
        (("q4_k_s",), lambda f: f.layer < 4, "q5_k"),
    ],
    "ffn_down": [
        (("q2_k",), ALWAYS, "q3_k"),
        (("q3_k_m",), lambda f: f.layer < f.model.n_layer // 16, "q5_k"),
        (("q3_k_m",), ALWAYS, "q4_k"),
        (("q3_k_l",), ALWAYS, "q5_k"),
        (("q4_k_m",), lambda f: more_bits(f.layer, f.model.n_layer), "q6_k"),
        (("q4_k_m",), ALWAYS, "q4_k"),  # ends llama.cpp's chain for Q4_K_M
        (("iq4_nl", "iq4_xs"), lambda f: f.layer < f.model.n_layer // 8 and not f.imatrix, "q5_k"),
        (("q5_k_m",), lambda f: more_bits(f.layer, f.model.n_layer), "q6_k"),
        (("q4_k_s",), lambda f: f.layer < f.model.n_layer // 8, "q5_k"),
        (("q4_0",), lambda f: f.imatrix and f.layer < f.model.n_layer // 8, "q4_1"),
        (("q5_0",), lambda f: f.imatrix and f.layer < f.model.n_layer // 8, "q5_1"),
    ],
    "attn_output": [
        (("q2_k",), ALWAYS, "q3_k"),
        (("q3_k_m",), ALWAYS, "q4_k"),
        (("q3_k_l",), ALWAYS, "q5_k"),
    ],
}
# a row length that does not fit: llama.cpp's next type (then F16 if that does not fit either)
FALLBACK = {"iq4_xs": "iq4_nl", "q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def category(name: str) -> str:
    """llama.cpp's tensor category, from the GGUF name (a fused attn_qkv counts as attn_v)."""
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_v"), ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
                     ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def quantized(name: str, shape: tuple[int, ...]) -> bool:
    """Whether llama.cpp quantizes the tensor at all: 2-D weights other than norms."""
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def choose(ftype: str, name: str, shape: tuple[int, ...], model: ModelShape, pure: bool = False,
           imatrix: bool = False) -> Choice:
    """The type GGUF tensor `name` (shape in numpy order: shape[-1] is the row length) is written
    as in a file of type `ftype`, as llama_model_quantize chooses it."""
    ft = file_type(ftype)
    if not ft.written:
        raise ValueError(f"{ft.name}: no per-tensor table here (llama.cpp's own quantizer writes it)")
    if not quantized(name, shape):
        return Choice("f32")
    base = ft.base
    if base in FLOATS:
        return Choice(base)
    ncols, new, why = shape[-1], base, ""
    cat = category(name)
    output = cat == "output" or (model.tied and cat == "token_embd")
    if not pure:
        if output:
            new = "q8_0" if not fits(base, ncols) else base if base == "q8_0" else "q6_k"
            why = "output matrix, as llama.cpp"
        else:
            layer = re.match(r"blk\.(\d+)\.", name)
            facts = Facts(int(layer.group(1)) if layer else 0, model, imatrix)
            for types, when, to in RULES.get(cat, ()):
                if ft.name in types and when(facts):
                    new, why = to, f"as llama.cpp's {ft.name} mix{' with an imatrix' if imatrix else ''}"
                    break
            if cat == "attn_v" and model.llama_70b and new in ("q3_k", "q4_k"):
                new, why = "q5_k", f"as llama.cpp's {ft.name} mix for a 70B llama"
    if not fits(new, ncols):
        to = FALLBACK.get(new)
        to = to if to is not None and fits(to, ncols) else "f16"
        why = f"rows of {ncols} do not fit {new}'s blocks of {_sizes(new)[0]}"
        if output and not pure:  # llama.cpp's output matrix: no surprise, no warning
            why = f"output matrix, as llama.cpp ({why})"
        new = to
    return Choice(new, f"{why}: {new}" if why and new != base else "")


def tuning_rule(type_name: str, qw=None, plain: str | None = None):
    """The torch function (weight -> dequantized weight) NPFT's rtn noise uses for a tensor written
    as `type_name` with imatrix entry `qw` (None: without one); None where that is `plain`'s own
    RTN, which the noise applies anyway. Exactly what is written for the types llama.cpp rounds to
    nearest (EXACT_RTN without an imatrix); for a scale search with a torch twin (grids/twins.py:
    the same rule to within near-ties), the twin on a GPU and llama.cpp's quantizer on the CPU
    (SearchRule); else llama.cpp's quantizer itself (exact; from a GPU, through the host), as for
    the few K-quant tensors of the legacy and IQ4 mixes. Q2_K and Q3_K files' own base type keeps
    the noise's RTN grid, an approximation of llama.cpp's scale search, until it has a twin
    (APPROXIMATED); Q4_K, Q5_K and Q6_K have twins."""
    from . import GRIDS
    from .twins import TWINNED, TwinRules

    if type_name in EXACT_RTN and (qw is None or type_name in ("q8_0", *FLOATS)):
        return None if type_name == plain else GRIDS[type_name].fakequant
    if type_name in TWINNED:
        return SearchRule(TwinRules(type_name, qw), qw).fakequant
    if type_name in APPROXIMATED and type_name == plain:
        return None
    from ..llamacpp import GgmlQuantizer

    return GgmlQuantizer(type_name, qw).fakequant


class SearchRule:
    """A scale search of llama.cpp's, for the tuning noise, run where the weight is: on a GPU its
    torch twin (no round trip through the host); on the CPU llama.cpp's own quantizer, which is
    exact and there cheaper than the twin (evals/TWINS.md: a SmolLM2 step 1.08x plain RTN's against
    the twin's 1.37x). `on_cpu = "twin"` makes the CPU run the twin too (evals/twins.py, tests)."""

    on_cpu = "llama.cpp"

    def __init__(self, twin, qw=None):
        self.twin, self.qw, self._exact = twin, qw, None

    @property
    def name(self) -> str:
        return self.twin.name

    def fakequant(self, w):
        if w.device.type != "cpu" or self.on_cpu == "twin":
            return self.twin.fakequant(w)
        if self._exact is None:
            from ..llamacpp import GgmlQuantizer

            self._exact = GgmlQuantizer(self.twin.name, self.qw)
        return self._exact.fakequant(w)

