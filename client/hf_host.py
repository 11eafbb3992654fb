"""Model-host helpers for a HF/PEFT model: capture what the router needs, act on its answer.

The host side of a routing round trip::

    captured = capture_inputs(model, prompt, modules=("q_proj", "v_proj"), tokenizer=tok)
    groups   = group_shared_inputs(captured)       # q_proj and v_proj of a layer share x
    z        = project(captured, shared_a)         # (T, r) per module, shared-A libraries
    g        = moments(z)                          # (r, r) per module, smallest form
    ... route through the service with one of these input forms ...
    apply_decision(peft_model, ["legal"])          # or top-k names + weights
    peft_model.generate(...)

All arrays crossing this module's boundary are numpy float32; torch stays inside. Module names
are canonical (PEFT path without ``base_model.model.``). For a vLLM host,
:func:`vllm_lora_request_args` turns a routed choice into ``LoRARequest(name, adapter_id + 1, path)``
arguments without importing vllm (vLLM's ids start at 1, the service's at 0).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from seqr_client.hf_models import targeted_linears

MIX_NAME = "seqr_mix"


class _StopForward(Exception):
    """Raised by the last capture hook: everything after the last targeted module is skipped."""


def _as_ids(prompt_or_ids: Any, tokenizer, max_length: int | None) -> torch.Tensor:
    if isinstance(prompt_or_ids, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs tokenizer=")
        ids = tokenizer(prompt_or_ids, return_tensors="pt", truncation=max_length is not None,
                        max_length=max_length)["input_ids"]
    elif isinstance(prompt_or_ids, Mapping):
        ids = torch.as_tensor(prompt_or_ids["input_ids"])
    else:
        ids = torch.as_tensor(np.asarray(prompt_or_ids), dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None, :]
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(f"expected one non-empty prompt, got input_ids of shape {tuple(ids.shape)}")
    if max_length is not None:
        ids = ids[:, :max_length]
    return ids  # (1, T)


def capture_inputs(model: torch.nn.Module, prompt_or_ids: Any, *, modules: Iterable[str],
                   tokenizer=None, max_length: int | None = None, stop_early: bool = True,
                   base_only: bool = True) -> dict[str, np.ndarray]:
    """Run the prompt once and return the *input* x of each targeted Linear module.

    ``prompt_or_ids``: a string (needs ``tokenizer``), a sequence/array/tensor of token ids (T,)
    or (1, T), or a mapping with ``input_ids``. ``modules``: target suffixes (``"q_proj"``) or
    canonical names. Works on a plain model and on a PEFT model (the LoRA layer's input, which is
    its base layer's input). With ``base_only`` (default) a PEFT model runs with its adapters
    disabled, so what is captured — and routed on — does not depend on whichever adapter happens
    to be active (an earlier layer's LoRA would change every later layer's input). With
    ``stop_early`` the forward stops after the last targeted module (no LM head).
    Returns ``{canonical name: (T, d_in) float32}`` in model order.
    """
    targets = targeted_linears(model, [modules] if isinstance(modules, str) else list(modules))
    if not targets:
        raise ValueError(f"no Linear module matches {modules!r}")
    ids = _as_ids(prompt_or_ids, tokenizer, max_length)
    captured: dict[str, np.ndarray] = {}
    last = next(reversed(targets))

    def hook_for(name: str):
        def hook(_mod, args, kwargs):
            x = args[0] if args else kwargs["x"]  # (1, T, d_in)
            captured[name] = x.detach()[0].to(torch.float32).cpu().numpy().copy()  # (T, d_in)
            if stop_early and name == last and len(captured) == len(targets):
                raise _StopForward
        return hook

    handles = [mod.register_forward_pre_hook(hook_for(n), with_kwargs=True)
               for n, mod in targets.items()]
    no_adapter = model.disable_adapter() if base_only and hasattr(model, "disable_adapter") \
        else contextlib.nullcontext()
    try:
        with torch.no_grad(), no_adapter:
            model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return {n: captured[n] for n in targets}


def group_shared_inputs(captured: Mapping[str, np.ndarray]) -> dict[str, str]:
    """``{module: group key}``: modules whose captured inputs are bit-identical (q/k/v_proj of one
    layer read the same normed hidden state) get the same key, the name of the group's first
    module in ``captured`` order, so the wire can carry one tensor per group."""
    first: dict[bytes, str] = {}
    out: dict[str, str] = {}
    for name, x in captured.items():
        x = np.ascontiguousarray(x)
        key = hashlib.sha256(str((x.dtype.str, x.shape)).encode() + x.tobytes()).digest()
        out[name] = first.setdefault(key, name)
    return out


def shared_a_matrices(recipe, signature: Iterable[tuple[str, int, int]], *, rank: int) -> dict[str, np.ndarray]:
    """``{module: A (rank, d_in) float32}`` of a library's shared-A recipe for a model signature
    (``hf_models.signature_of``)."""
    from seqr_core.shared_a import generate_shared_a

    return {name: generate_shared_a(recipe, module=name, rank=rank, d_in=d_in)
            for name, d_in, _ in signature}


def project(captured: Mapping[str, np.ndarray], shared_a: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{module: z = x Aᵀ (T, r) float32}`` for shared-A libraries — the projected input form.

    Accumulates in float64 and rounds once to float32. Every captured module needs an A."""
    missing = [m for m in captured if m not in shared_a]
    if missing:
        raise ValueError(f"no shared A for modules {missing[:3]}{'...' if len(missing) > 3 else ''}")
    out = {}
    for m, x in captured.items():
        a = np.asarray(shared_a[m])  # (r, d)
        if x.ndim != 2 or a.ndim != 2 or x.shape[1] != a.shape[1]:
            raise ValueError(f"{m}: x {x.shape} and A {a.shape} do not fit (need (T, d) and (r, d))")
        out[m] = (x.astype(np.float64) @ a.astype(np.float64).T).astype(np.float32)  # (T, r)
    return out


def moments(z):
    """Second moment ``G = zᵀz / T`` (r, r) float32 of projected inputs z (T, r); a dict of them
    gives a dict of G. The moments input form: ``tr(R G Rᵀ)`` is the token mean of ‖R z‖²."""
    if isinstance(z, Mapping):
        return {m: moments(v) for m, v in z.items()}
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] == 0:
        raise ValueError(f"z must be (T, r) with T >= 1, got {z.shape}")
    return (z.T @ z / z.shape[0]).astype(np.float32)  # (r, r)


def load_adapters(model: torch.nn.Module, adapter_dirs: Mapping[str, str | os.PathLike]):
    """Wrap ``model`` in a PeftModel holding every adapter of ``adapter_dirs`` ({name: PEFT
    folder}) under its name. The first one is active."""
    from peft import PeftModel

    items = list(adapter_dirs.items())
    if not items:
        raise ValueError("adapter_dirs is empty")
    name, path = items[0]
    with warnings.catch_warnings():  # transformers' deprecation notice reached through peft
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = PeftModel.from_pretrained(model, str(path), adapter_name=name, is_trainable=False)
    for name, path in items[1:]:
        peft_model.load_adapter(str(path), adapter_name=name, is_trainable=False)
    peft_model.eval()
    return peft_model


def apply_decision(peft_model, adapter_names: str | Sequence[str],
                   weights: Sequence[float] | None = None, *, mix_name: str = MIX_NAME) -> str:
    """Make the routed adapter(s) active on a PEFT model; returns the active adapter's name.

    One name → ``set_adapter(name)``. Several (top-k) → a weighted combination built with PEFT's
    ``add_weighted_adapter(..., combination_type="cat")`` under ``mix_name`` (``weights`` default
    to equal; pass the router's softmax weights). Why ``cat``: it stacks ``w_i·s_i·A_i`` and
    ``B_i`` into one rank-Σr adapter, so ΔW = Σ w_i·s_i·B_i·A_i *exactly*, for shared-A and
    general adapters alike. ``linear`` averages A's and B's separately with √w_i, which adds
    cross terms B_i·A_j (and needs equal ranks) — not the weighted sum of the updates. The mix
    is rebuilt only when names or weights change; its scaling is pinned to 1 (the weights and
    scales live in A).
    """
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    if not names:
        raise ValueError("adapter_names is empty")
    unknown = [n for n in names if n not in peft_model.peft_config]
    if unknown:
        raise KeyError(f"adapters not loaded in the PEFT model: {unknown}")
    if len(names) == 1:
        peft_model.set_adapter(names[0])
        return names[0]
    w = [1.0 / len(names)] * len(names) if weights is None else [float(x) for x in weights]
    if len(w) != len(names) or not all(np.isfinite(w)):
        raise ValueError(f"need one finite weight per adapter, got {weights!r} for {names}")
    key = (tuple(names), tuple(w))
    if getattr(peft_model, "_seqr_mix_key", None) != key or mix_name not in peft_model.peft_config:
        if mix_name in peft_model.peft_config:
            peft_model.set_adapter(names[0])
            peft_model.delete_adapter(mix_name)
        peft_model.add_weighted_adapter(names, w, adapter_name=mix_name, combination_type="cat")
        for mod in peft_model.modules():
            if hasattr(mod, "scaling") and isinstance(mod.scaling, dict) and mix_name in mod.scaling:
                mod.scaling[mix_name] = 1.0  # exact Σ w_i s_i B_i A_i even with use_rslora
        peft_model._seqr_mix_key = key
    peft_model.set_adapter(mix_name)
    return mix_name


def _field(choice: Any, *keys: str):
    for k in keys:
        if isinstance(choice, Mapping) and k in choice:
            return choice[k]
        if not isinstance(choice, Mapping) and hasattr(choice, k):
            return getattr(choice, k)
    return None


VLLM_ID_OFFSET = 1


def vllm_lora_request_args(choice: Any, adapter_dirs: Mapping[str, str | os.PathLike]) -> tuple[str, int, str]:
    """``(lora_name, lora_int_id, lora_path)`` for ``vllm.lora.request.LoRARequest`` from one routed
    choice: an object or mapping with ``name`` and ``adapter_id`` (or ``int_id`` / ``id``), or a
    ``(name, adapter_id)`` pair. ``adapter_dirs`` maps adapter names to the PEFT folders the vLLM
    host can read.

    The id mapping: ``lora_int_id = adapter_id + 1``. vLLM needs a unique ``lora_int_id >= 1``
    (0 means "no LoRA") while the service numbers a library's adapters from 0. The service's ids
    are stable and never reused, so the shifted ids are unique and stable too; subtract 1 to get
    back to the service's id.
    """
    if isinstance(choice, (tuple, list)) and len(choice) == 2:
        name, adapter_id = choice
    else:
        name = _field(choice, "name", "adapter")
        adapter_id = _field(choice, "adapter_id", "int_id", "id")
    if not name or adapter_id is None:
        raise ValueError(f"choice needs a name and an adapter id, got {choice!r}")
    if isinstance(adapter_id, bool) or int(adapter_id) != adapter_id or int(adapter_id) < 0:
        raise ValueError(f"adapter ids are integers >= 0, got {adapter_id!r} for {name!r}")
    if name not in adapter_dirs:
        raise KeyError(f"no adapter folder known for {name!r}")
    return str(name), int(adapter_id) + VLLM_ID_OFFSET, str(Path(adapter_dirs[name]).resolve())


def generate_text(peft_model, tokenizer, prompt: str, *, max_new_tokens: int = 32) -> str:
    """Greedy continuation of ``prompt`` with whatever adapter is active (decoded new tokens)."""
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = peft_model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
