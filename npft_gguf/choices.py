"""Fixed choices shared by the command line and the stages behind it. No imports, so the CLI can
build its options (and `--help`) from them without loading torch or gguf."""

from dataclasses import dataclass


@dataclass(frozen=True)
class FileType:
    """One GGUF file type: what `--type` takes (llama-quantize's name in lower case), the tensor type
    most weights get, a phrase for the help, and whether our writer writes it (grids/mix.py holds
    llama.cpp's per-tensor choices for it) or only llama.cpp's own llama_model_quantize does."""
    name: str
    base: str
    help: str
    written: bool = True


FILE_TYPES = {t.name: t for t in (
    FileType("f32", "f32", "float32, lossless"),
    FileType("f16", "f16", "float16"),
    FileType("bf16", "bf16", "bfloat16"),
    FileType("q8_0", "q8_0", "8.5 bits a weight"),
    FileType("q4_0", "q4_0", "4.5 bits, llama.cpp's simplest and fastest 4-bit type"),
    FileType("q4_1", "q4_1", "5 bits"),
    FileType("q5_0", "q5_0", "5.5 bits"),
    FileType("q5_1", "q5_1", "6 bits"),
    FileType("iq4_nl", "iq4_nl", "4.5 bits on a non-uniform grid: q4_0's size, closer to the float model"),
    FileType("iq4_xs", "iq4_xs", "4.25 bits, non-uniform, 256-weight super-blocks"),
    FileType("q2_k", "q2_k", "llama.cpp's Q2_K mix"),
    FileType("q3_k_s", "q3_k", "llama.cpp's Q3_K_S mix"),
    FileType("q3_k_m", "q3_k", "llama.cpp's Q3_K_M mix"),
    FileType("q3_k_l", "q3_k", "llama.cpp's Q3_K_L mix"),
    FileType("q4_k_s", "q4_k", "llama.cpp's Q4_K_S mix"),
    FileType("q4_k_m", "q4_k", "llama.cpp's Q4_K_M mix, the GGUF most people download"),
    FileType("q5_k_s", "q5_k", "llama.cpp's Q5_K_S mix"),
    FileType("q5_k_m", "q5_k", "llama.cpp's Q5_K_M mix"),
    FileType("q6_k", "q6_k", "6.56 bits"),
    FileType("iq3_xxs", "iq3_xxs", "llama.cpp's IQ3_XXS mix (needs an imatrix)", written=False),
    FileType("iq3_xs", "iq3_s", "llama.cpp's IQ3_XS mix", written=False),
    FileType("iq3_s", "iq3_s", "llama.cpp's IQ3_S mix", written=False),
    FileType("iq3_m", "iq3_s", "llama.cpp's IQ3_M mix", written=False),
)}
ALIASES = {"q3_k": "q3_k_s", "q4_k": "q4_k_s", "q5_k": "q5_k_s"}  # llama-quantize's own short names
EXPORT_TYPES = tuple(FILE_TYPES) + tuple(ALIASES)  # export --type
WRITTEN_TYPES = tuple(n for n, t in FILE_TYPES.items() if t.written) + tuple(ALIASES)  # export without --quantizer llama.cpp
# the tensor types with a torch grid (grids.GRIDS): what convert/finetune tune for and --fake-quant simulates
GRID_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
# the types whose importance-weighted rules have torch twins on the tuning device (grids/twins.py; a
# mix: its base type's and the other types it gives some tensors): what npft+imatrix tunes for
TUNED_WITH_IMATRIX = ("q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k",
                      "q4_k", "q5_k")
# what convert and finetune tune for: the grids, and llama.cpp's K mixes whose base type has a grid
# (the noise meets each tensor's own rule of the mix: imatrix.tuning_quantizers)
TUNED_TYPES = GRID_TYPES + tuple(n for n, t in FILE_TYPES.items() if t.written and t.base in GRID_TYPES
                                 and n not in GRID_TYPES)


def canonical_type(name: str) -> str | None:
    """The registry's name for a --type value (case-insensitive, aliases resolved); None if unknown."""
    key = ALIASES.get(name.lower(), name.lower())
    return key if key in FILE_TYPES else None


def base_type(name: str) -> str:
    """The tensor type most weights of file type `name` get (q4_k_m -> q4_k); a name the registry does
    not hold (a simulated quantizer, rtn4) is returned as it is."""
    key = canonical_type(name)
    return FILE_TYPES[key].base if key else name

# --bits N: the pure-RTN GGUF types of that width, best first (the first one every row length fits wins)
BITS = {2: ("q2_k",), 3: ("q3_k",), 4: ("q4_0",), 5: ("q5_0",), 6: ("q6_k", "q8_0"), 8: ("q8_0",)}
# auto: npft+imatrix where llama.cpp's importance-weighted rules exist for the type written, else npft
METHODS = ("auto", "npft", "rtn", "gptq", "npft+gptq", "owq", "imatrix", "npft+imatrix")
# the files of about the same size a user could get from llama.cpp instead (convert's closing comparison
# shows them beside the output, each with its size): same-size types, and the K mix of the width
PEERS = {"q4_0": ("iq4_nl", "q4_k_m"), "q4_1": ("iq4_nl", "q4_k_m"), "iq4_nl": ("q4_0", "q4_k_m"),
         "q5_0": ("q5_k_m",), "q5_1": ("q5_k_m",)}
# convert's default bound on its closing evaluation, in windows of --ctx for each file compared: 100 x 512
# tokens is about a sixth of WikiText-2's test text (the whole of it, for five or six files, was the longest
# stage of every real run: hours of llama.cpp on a CPU); --eval-chunks all for the whole text
EVAL_CHUNKS = 100
