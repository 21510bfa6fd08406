"""Which type each tensor gets for a file type: llama.cpp's own choices, so files are comparable.

llama.cpp (llama-quant.cpp) quantizes 2-D weights only, gives the output matrix (or the token
embedding when it is tied to the output) Q6_K, or Q8_0 when its rows do not fit the target's
block, adds IQ4_NL's few Q5_K tensors, and falls back per tensor when a row length does not fit
a type's block. `--pure` keeps one type everywhere except where the shape forces a fallback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import LlamaFileType

from . import GRIDS, Grid

FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}

FILE_TYPES = {
    "f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0, "q4_1": LlamaFileType.MOSTLY_Q4_1,
    "q5_0": LlamaFileType.MOSTLY_Q5_0, "q5_1": LlamaFileType.MOSTLY_Q5_1, "iq4_nl": LlamaFileType.MOSTLY_IQ4_NL,
    "q2_k": LlamaFileType.MOSTLY_Q2_K, "q3_k": LlamaFileType.MOSTLY_Q3_K_S, "q4_k": LlamaFileType.MOSTLY_Q4_K_S,
    "q5_k": LlamaFileType.MOSTLY_Q5_K_S, "q6_k": LlamaFileType.MOSTLY_Q6_K,
}
FLOATS = ("f32", "f16", "bf16")


@dataclass(frozen=True)
class Choice:
    grid: Grid
    note: str = ""  # why it differs from the file type, for the warning and the report


@dataclass(frozen=True)
class ModelShape:
    n_layer: int
    n_gqa: int
    tied: bool

    @classmethod
    def of(cls, config) -> "ModelShape":
        """The facts of a transformers config that llama.cpp's type mix depends on."""
        heads = config.num_attention_heads
        return cls(n_layer=config.num_hidden_layers,
                   n_gqa=heads // (getattr(config, "num_key_value_heads", None) or heads),
                   tied=bool(getattr(config, "tie_word_embeddings", False)))


def _fit(name: str, grid: Grid, ncols: int) -> Choice:
    if grid.fits(ncols):
        return Choice(grid)
    fallback = GRIDS.get(FALLBACK.get(grid.name, ""), grid)
    if not fallback.fits(ncols):
        fallback = GRIDS["f16"]
    return Choice(fallback, f"rows of {ncols} do not fit {grid.name}'s blocks of {grid.block}: {fallback.name}")


def choose(ftype: str, name: str, shape: tuple[int, ...], model: ModelShape, pure: bool = False,
           imatrix: bool = False) -> Choice:
    """The type of GGUF tensor `name` (GGUF shape order reversed: shape[-1] is the row length).
    With an importance matrix llama.cpp's mix differs in the first eighth of the ffn_down layers:
    Q4_0/Q5_0 give them Q4_1/Q5_1, IQ4_NL keeps them (instead of Q5_K)."""
    if len(shape) < 2 or not name.endswith(".weight"):
        return Choice(GRIDS["f32"])
    grid = GRIDS[ftype]
    if ftype in FLOATS:
        return Choice(grid)
    ncols = shape[-1]
    if not pure:
        is_output = name == "output.weight" or (model.tied and name == "token_embd.weight")
        layer = re.match(r"blk\.(\d+)\.", name)
        early = bool(layer) and int(layer.group(1)) < model.n_layer // 8
        if is_output:
            if ncols % grid.block != 0:
                return Choice(GRIDS["q8_0"], "output matrix, as llama.cpp: q8_0")
            if grid.name != "q8_0":
                c = _fit(name, GRIDS["q6_k"], ncols)
                return Choice(c.grid, "output matrix, as llama.cpp: " + c.grid.name)
        elif ftype == "iq4_nl" and (
            (name.endswith("attn_v.weight") and model.n_gqa >= 4)
            or (name.endswith("ffn_down.weight") and early and not imatrix)
        ):
            c = _fit(name, GRIDS["q5_k"], ncols)
            return Choice(c.grid, "as llama.cpp's iq4_nl mix: " + c.grid.name)
        elif ftype in ("q4_0", "q5_0") and imatrix and name.endswith("ffn_down.weight") and early:
            c = _fit(name, GRIDS["q4_1" if ftype == "q4_0" else "q5_1"], ncols)
            return Choice(c.grid, f"as llama.cpp's {ftype} mix with an imatrix: " + c.grid.name)
    return _fit(name, grid, ncols)
