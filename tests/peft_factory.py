"""Real PEFT adapters made at test time on a tiny random Llama (no download, no hub)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from seqr_core import SharedARecipe, generate_shared_a, signature_from_hf_config


def tiny_llama(*, hidden: int = 32, layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def signature(model, base_model="tiny-llama"):
    return signature_from_hf_config(model.config.to_dict(), base_model=base_model)


def make_peft_adapter(model, out_dir: Path, *, seed: int, rank: int = 4, alpha: int = 8,
                      shared_a: SharedARecipe | None = None, targets=("q_proj", "v_proj"),
                      dtype: torch.dtype = torch.float32, use_rslora: bool = False) -> Path:
    """Save a PEFT LoRA with random B (and the library's shared A if given)."""
    from peft import LoraConfig, get_peft_model
    import copy
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
        use_rslora=use_rslora))
    with torch.no_grad():
        for name, mod in peft_model.named_modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                canonical = name.removeprefix("base_model.model.")
                A = mod.lora_A["default"].weight
                if shared_a is not None:
                    A.copy_(torch.from_numpy(generate_shared_a(shared_a, module=canonical,
                                                               rank=rank, d_in=A.shape[1])))
                mod.lora_B["default"].weight.normal_(0, 0.5)
        if dtype != torch.float32:
            peft_model = peft_model.to(dtype)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir)


def read_dir(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in Path(path).iterdir() if p.is_file()}
