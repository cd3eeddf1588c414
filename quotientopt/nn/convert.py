"""Convert a model's attention modules to quotient modules, and back, computing the same function.

Supported: every type registered in :mod:`quotientopt.nn.adapters` with a ``to_quotient``
(``convert``) or ``to_standard`` (``export``): ``torch.nn.MultiheadAttention`` (also inside
``torch.nn.TransformerEncoder`` layers), the reference GPT's ``CausalSelfAttention`` (registered
when :mod:`quotientopt.models` is imported, as it is by building a GPT), and, with
``transformers`` installed (the ``hf`` extra) and imported, Hugging Face's ``GPT2Attention`` and
``BertAttention``. :func:`register_conversion` adds a pair of types.

``convert`` first builds every replacement and only then swaps them in, so an unsupported module
raises before the model is touched: a model is never left half-converted.
"""

from __future__ import annotations

from torch import nn

from quotientopt.nn.adapters import attention_modules, no_attention_error, register_conversion

__all__ = ["convert", "export", "register_conversion"]


def _swap(model: nn.Module, direction: str, what: str, **options) -> nn.Module:
    """Replace every outermost module of ``model`` whose adapter has ``direction``
    (``"to_quotient"`` or ``"to_standard"``) by what it builds."""
    replacements = []
    for path, module, adapter in list(attention_modules(model, direction)):
        builder = getattr(adapter, direction)
        try:
            new = builder(module, **options) if options else builder(module)
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"cannot {what} the module at '{path or '<root>'}' ({type(module).__name__}): {error}"
            ) from None
        replacements.append((path, new))
    if not replacements:
        if direction == "to_quotient" and next(attention_modules(model, "spec"), None) is not None:
            return model  # already quotient modules: nothing left to convert
        raise no_attention_error(what, model, direction)
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
    return _swap(model, "to_quotient", "convert", **options)


def export(model: nn.Module) -> nn.Module:
    """Replace every quotient attention module of ``model`` by the standard module it came from."""
    return _swap(model, "to_standard", "export")
