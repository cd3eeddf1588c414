"""Convert a model's attention modules to quotient modules, and back, computing the same function.

Supported: ``torch.nn.MultiheadAttention`` (also inside ``torch.nn.TransformerEncoder`` layers), the
reference GPT's ``CausalSelfAttention``, and, with ``transformers`` installed (the ``hf`` extra),
Hugging Face's ``GPT2Attention`` and ``BertAttention``.

``convert`` first builds every replacement and only then swaps them in, so an unsupported module
raises before the model is touched: a model is never left half-converted.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from quotientopt.nn.attention import QuotientMultiheadAttention

# type -> function building the replacement; other modules (the reference GPT, Hugging Face
# attention) register theirs with `register_conversion`.
_CONVERTERS: dict[type, Callable[..., nn.Module]] = {
    nn.MultiheadAttention: lambda module, **options: QuotientMultiheadAttention.from_torch(
        module, **options
    ),
}
_EXPORTERS: dict[type, Callable[[nn.Module], nn.Module]] = {
    QuotientMultiheadAttention: lambda module: module.to_torch(),
}


def register_conversion(
    standard: type,
    quotient: type,
    to_quotient: Callable[..., nn.Module],
    to_standard: Callable[[nn.Module], nn.Module],
) -> None:
    """Teach :func:`convert` and :func:`export` a new pair of module types."""
    _CONVERTERS[standard] = to_quotient
    _EXPORTERS[quotient] = to_standard


def _load_optional_conversions() -> None:
    """Register the reference GPT's attention, and Hugging Face's when transformers is installed."""
    import quotientopt.models.gpt  # registers on import

    try:
        import transformers  # noqa: F401
    except ImportError:
        return
    import quotientopt.nn.huggingface  # noqa: F401  (registers on import)


def _swap(model: nn.Module, table: dict[type, Callable], what: str, **options) -> nn.Module:
    _load_optional_conversions()
    replacements = []
    for path, module in model.named_modules():
        builder = table.get(type(module))
        if builder is None or any(
            path.startswith(f"{done}.") or done == "" for done, _ in replacements
        ):
            continue  # not convertible, or inside a module that is being replaced whole
        try:
            new = builder(module, **options) if options else builder(module)
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"cannot {what} the module at '{path or '<root>'}' ({type(module).__name__}): {error}"
            ) from None
        replacements.append((path, new))
    if not replacements:
        return model
    if replacements[0][0] == "":
        return replacements[0][1]  # the model itself is an attention module
    for path, new in replacements:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, new)
    return model


def convert(model: nn.Module, **options) -> nn.Module:
    """Replace every supported attention module of ``model`` (in place; also returned) by its
    quotient twin; ``options`` (e.g. ``qk_geometry="orthogonal"``) go to the new modules."""
    return _swap(model, _CONVERTERS, "convert", **options)


def export(model: nn.Module) -> nn.Module:
    """Replace every quotient attention module of ``model`` by the standard module it came from."""
    return _swap(model, _EXPORTERS, "export")
