"""A library's shared A as files any LoRA trainer can load (`seqr libraries shared-a`).

    DIR/shared_a.safetensors   base_model.model.<module>.lora_A.weight -> A (r, d_in) float32,
                               exactly the names PEFT's save_pretrained writes, so
                               peft.set_peft_model_state_dict puts each A into its lora_A
    DIR/shared_a.json          library, version, base model, rank, seed, target modules, modules
    DIR/README.md              the recipe: load, freeze lora_A, train lora_B, save, upload

An adapter trained that way keeps lora_A bit for bit (if saved in float32; fp16/bf16 copies are
accepted within their rounding) and the service stores it as kind shared-A.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from seqr_core import write_safetensors

from .results import LibraryInfo

PEFT_PREFIX = "base_model.model."
TENSORS = "shared_a.safetensors"
META = "shared_a.json"

README = """# Shared A of library {library} (v{version})

Adapters of this library share one frozen `lora_A` per module; you train only `lora_B`.

```python
import json
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

meta = json.load(open("{dir}/shared_a.json"))
model = get_peft_model(base_model, LoraConfig(r=meta["rank"], lora_alpha=2 * meta["rank"],
                                              target_modules=meta["target_modules"], lora_dropout=0.0))
set_peft_model_state_dict(model, load_file("{dir}/shared_a.safetensors"))   # lora_A := shared A
for name, p in model.named_parameters():
    if "lora_A" in name:
        p.requires_grad_(False)                                               # A stays frozen
# ... train with your own loop or trainer (only lora_B has gradients) ...
model.save_pretrained("my-adapter", safe_serialization=True)
```

Then `seqr adapters put my-adapter --library {library}`: the service checks every lora_A against
this A and stores the adapter as kind shared_a (the fast, exact SEQR path). Any lora_alpha works
(the scale is part of the adapter). Keep the model in float32 while saving, or accept that
fp16/bf16 copies of A are matched within their rounding.
"""


def target_suffixes(modules: list[str], all_modules: list[str]) -> list[str]:
    """PEFT ``target_modules`` for ``modules``: their name suffixes when those select exactly
    ``modules`` among ``all_modules``, else the full names (PEFT matches those too)."""
    suffixes = sorted({m.rsplit(".", 1)[-1] for m in modules})
    picked = [m for m in all_modules if m.rsplit(".", 1)[-1] in suffixes]
    return suffixes if sorted(picked) == sorted(modules) else sorted(modules)


def write_shared_a(info: LibraryInfo, out: Path, *, force: bool = False) -> dict:
    """Write the files above for ``info`` (a describe with ``include_shared_a=True``); returns the
    shared_a.json document. Refuses a library without a shared A, and existing files unless ``force``."""
    if not info.shared_a:
        raise SystemExit(f"library {info.name!r} has no shared A (its adapters take the general path); "
                         "there is nothing to train against")
    ranks = {int(a.shape[0]) for a in info.shared_a.values()}
    if len(ranks) != 1:
        raise SystemExit(f"library {info.name!r} has shared A of several ranks {sorted(ranks)}; "
                         "PEFT needs one r per LoraConfig (use rank_pattern)")
    out.mkdir(parents=True, exist_ok=True)
    existing = [f for f in (TENSORS, META, "README.md") if (out / f).exists()]
    if existing and not force:
        raise SystemExit(f"{out} already holds {existing}; use --force to overwrite")
    modules = sorted(info.shared_a)
    recipe = info.shared_a_recipe
    doc = {"library": info.name, "version": info.version, "base_model": info.base_model,
           "rank": ranks.pop(), "seed": recipe.seed if recipe else None,
           "recipe": {"seed": recipe.seed, "scheme": recipe.scheme, "rng": recipe.rng} if recipe else None,
           "target_modules": target_suffixes(modules, [m.name for m in info.modules]),
           "modules": modules, "dtype": "float32",
           "tensor_names": f"{PEFT_PREFIX}<module>.lora_A.weight"}
    tensors = {f"{PEFT_PREFIX}{m}.lora_A.weight": np.ascontiguousarray(info.shared_a[m], dtype=np.float32)
               for m in modules}
    (out / TENSORS).write_bytes(write_safetensors(tensors))
    (out / META).write_text(json.dumps(doc, indent=1) + "\n")
    (out / "README.md").write_text(README.format(library=info.name, version=info.version, dir=out))
    return doc
