"""The architecture registry: one module per model family (llama.py, qwen2.py, ...), each a
`Family` registered by its Hugging Face class names and model types and by its GGUF arch.

Every stage asks here (sources, writer, sensitivity, NPFT, GPTQ, validation, CLI defaults), so a
new family is one new file that subclasses `base.Family` and calls `register`.
"""

from __future__ import annotations

from ..errors import UsageError

FAMILIES: dict[str, "Family"] = {}  # GGUF arch name -> family


def register(family) -> None:
    FAMILIES[family.name] = family


def supported() -> str:
    return ", ".join(sorted({t for f in FAMILIES.values() for t in f.hf_model_types}))


def for_config(config):
    """The family of an HF config (checked: what it cannot express is refused here), or a
    UsageError naming what is supported."""
    model_type = getattr(config, "model_type", None)
    classes = tuple(getattr(config, "architectures", None) or ())
    for family in FAMILIES.values():
        if model_type in family.hf_model_types or any(c in family.hf_classes for c in classes):
            family.check_config(config)
            return family
    what = model_type or (classes[0] if classes else "unknown")
    raise UsageError(f"architecture {what!r} is not supported yet; supported: {supported()} (npft-gguf archs lists them)")


def unwrap(config):
    """(text config, weight prefixes) where `config` is a multimodal checkpoint whose text model a
    family serves (Gemma3ForConditionalGeneration), else None."""
    model_type = getattr(config, "model_type", None)
    classes = tuple(getattr(config, "architectures", None) or ())
    for family in FAMILIES.values():
        for outer, (attr, prefixes) in family.wrappers.items():
            if model_type == outer or any(c == outer for c in classes):
                inner = getattr(config, attr)
                inner.architectures = [family.hf_classes[0]]
                return inner, prefixes
    return None


def for_gguf(name):
    if not isinstance(name, str) or name not in FAMILIES:
        raise UsageError(f"GGUF architecture {name!r} is not supported yet; supported: {', '.join(FAMILIES)} "
                         "(npft-gguf archs lists them)")
    return FAMILIES[name]


def of_model(model):
    """The family of a transformers (or peft-wrapped) model, from its config."""
    return for_config(model.config)


from . import gemma3, llama, phi3, qwen2, qwen3  # noqa: E402,F401 - each registers itself
from .base import Family, config_problem  # noqa: E402,F401
