"""Base-model signatures and module names.

A library serves one base model. Its signature lists the LoRA-targetable linear modules with
their input and output sizes; every adapter and every request is checked against it.
Module names are PEFT's module paths without the ``base_model.model.`` wrapper prefix,
e.g. ``model.layers.3.self_attn.q_proj``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidArgumentError, NotFoundError

_PEFT_PREFIX = "base_model.model."
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.[A-Za-z0-9_]+)?\.weight$")
_NAME_OK = re.compile(r"^[A-Za-z0-9_.\-]{1,256}$")


@dataclass(frozen=True)
class ModuleSpec:
    """One LoRA-targetable linear layer: y = W x with x of size d_in, y of size d_out."""

    name: str
    d_in: int
    d_out: int

    def __post_init__(self) -> None:
        if not _NAME_OK.match(self.name):
            raise InvalidArgumentError("module name must match [A-Za-z0-9_.-]{1,256}",
                                       field="signature.modules.name", actual=self.name)
        for f in ("d_in", "d_out"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1 or v > 1 << 20:
                raise InvalidArgumentError("module size must be an int in [1, 2**20]",
                                           field=f"signature.modules[{self.name}].{f}", actual=v)


@dataclass(frozen=True)
class BaseModelSignature:
    """The base model a library serves: a free-form name and its targetable modules."""

    base_model: str
    modules: tuple[ModuleSpec, ...]

    def __post_init__(self) -> None:
        if not self.modules:
            raise InvalidArgumentError("a signature needs at least one module",
                                       field="signature.modules", limit=">=1", actual=0)
        names = [m.name for m in self.modules]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise InvalidArgumentError("duplicate module names", field="signature.modules",
                                       actual=dup)
        object.__setattr__(self, "_by_name", {m.name: m for m in self.modules})

    def spec(self, name: str, *, field: str = "module") -> ModuleSpec:
        try:
            return self._by_name[name]  # type: ignore[attr-defined]
        except KeyError:
            raise NotFoundError(f"module {name!r} is not in the base-model signature of "
                                f"{self.base_model!r}", field=field, actual=name) from None

    def has(self, name: str) -> bool:
        return name in self._by_name  # type: ignore[attr-defined]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.modules)

    def to_dict(self) -> dict:
        return {"base_model": self.base_model,
                "modules": [[m.name, m.d_in, m.d_out] for m in self.modules]}

    @classmethod
    def from_dict(cls, d: dict) -> "BaseModelSignature":
        return cls(base_model=str(d["base_model"]),
                   modules=tuple(ModuleSpec(str(n), int(i), int(o)) for n, i, o in d["modules"]))


def split_peft_key(key: str) -> tuple[str, str]:
    """``base_model.model.X.lora_A[.adapter].weight`` -> (``X``, ``lora_A``).

    Raises InvalidArgumentError for any key that is not a plain LoRA A/B weight.
    """
    m = _PEFT_KEY.match(key)
    if m is None:
        raise InvalidArgumentError("not a LoRA A/B weight (only plain LoRA is supported: no "
                                   "biases, embeddings, DoRA magnitudes or modules_to_save)",
                                   field="adapter_model.safetensors", actual=key)
    module = m.group("module")
    if module.startswith(_PEFT_PREFIX):
        module = module[len(_PEFT_PREFIX):]
    return module, m.group("part")


def llama_signature(*, base_model: str, hidden: int, intermediate: int, layers: int,
                    heads: int, kv_heads: int, head_dim: int | None = None) -> BaseModelSignature:
    """Signature of a Llama-family decoder (llama, mistral, qwen2, smollm2): 7 linears/layer."""
    hd = head_dim or hidden // heads
    q, kv = heads * hd, kv_heads * hd
    shapes = {"self_attn.q_proj": (hidden, q), "self_attn.k_proj": (hidden, kv),
              "self_attn.v_proj": (hidden, kv), "self_attn.o_proj": (q, hidden),
              "mlp.gate_proj": (hidden, intermediate), "mlp.up_proj": (hidden, intermediate),
              "mlp.down_proj": (intermediate, hidden)}
    mods = tuple(ModuleSpec(f"model.layers.{i}.{k}", di, do)
                 for i in range(layers) for k, (di, do) in shapes.items())
    return BaseModelSignature(base_model=base_model, modules=mods)


def signature_from_hf_config(config: dict, *, base_model: str = "") -> BaseModelSignature:
    """Signature from a transformers ``config.json`` dict of a Llama-family model."""
    try:
        return llama_signature(
            base_model=base_model or str(config.get("_name_or_path") or config.get("model_type")),
            hidden=int(config["hidden_size"]), intermediate=int(config["intermediate_size"]),
            layers=int(config["num_hidden_layers"]), heads=int(config["num_attention_heads"]),
            kv_heads=int(config.get("num_key_value_heads") or config["num_attention_heads"]),
            head_dim=config.get("head_dim"))
    except KeyError as e:
        raise InvalidArgumentError("config.json lacks a Llama-family size field",
                                   field=f"config.{e.args[0]}") from None
