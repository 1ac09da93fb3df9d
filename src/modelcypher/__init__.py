"""ModelCypher: align and merge neural networks with geometry.

Floors, top to bottom (imports only point down; tests/test_layers.py checks it): ``cli`` -> ``api`` ->
``measure`` -> ``align`` -> ``merging`` -> ``hf`` -> ``arch``, ``checkpoint``, ``options`` -> ``errors``.
``zoo`` sits outside, as a user of the package.

The API is imported lazily so that ``modelcypher --help`` does not pay for torch.
"""

__version__ = "0.1.0"
__all__ = ["merge", "plan_merge", "extract_lora", "UserError"]


def __getattr__(name: str):
    if name in ("merge", "plan_merge", "extract_lora"):
        from modelcypher import api

        return getattr(api, name)
    if name == "UserError":
        from modelcypher.errors import UserError

        return UserError
    raise AttributeError(f"module 'modelcypher' has no attribute {name!r}")
