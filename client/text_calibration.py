"""`seqr calibrate --texts`: calibration traffic from text, captured on the host.

Each prompt runs once through the base model (``hf_host.capture_inputs``, stopped after the last
targeted module); the inputs of the modules the library's adapters target are then streamed to
Calibrate one sequence per message, in the smallest form that serves every adapter on the module:
``projected`` z = A·x (T×r) where all of them share the library's A, ``activations`` x where
one has its own A. Modules reading the same hidden state (q_proj and v_proj of a layer) send it
once. Nothing is written to disk (captures stay in memory, bounded) and the service keeps only
streaming statistics.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .results import CalibrationResult, LibraryInfo


def read_texts(paths: Sequence[str | Path], *, chunk_chars: int) -> list[str]:
    """Prompts from text files (cut into ~``chunk_chars`` chunks at line breaks) and .jsonl
    files (one JSON string, or object with ``text`` or ``prompt``, per line)."""
    from .training import chunk_text

    out: list[str] = []
    for path in map(Path, paths):
        raw = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix != ".jsonl":
            out += chunk_text(raw, size=chunk_chars)
            continue
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            doc = json.loads(line)
            text = doc if isinstance(doc, str) else doc.get("text", doc.get("prompt")) if isinstance(doc, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{n}: expected a JSON string or an object with 'text' or 'prompt'")
            if text.strip():
                out.append(text)
    return out


def module_forms(info: LibraryInfo, *, form: str = "auto") -> dict[str, str]:
    """``{module: "projected" | "activations"}`` for every module an adapter targets."""
    shared = {m.name for m in info.modules if m.shared_rank}
    targeted: dict[str, bool] = {}          # module -> every adapter on it is shared-A
    for a in info.adapters:
        if a.status != "ready":
            continue
        for m in a.modules:
            targeted[m] = targeted.get(m, True) and a.kind == "shared_a" and m in shared
    if form != "auto":
        if form == "projected" and not all(targeted.values()):
            raise ValueError("--form projected: some targeted modules have adapters with their own A "
                             "(they need activations); use --form auto")
        return {m: form for m in targeted}
    return {m: "projected" if all_shared else "activations" for m, all_shared in targeted.items()}


def check_model(model, info: LibraryInfo, modules: Iterable[str]) -> None:
    """The model must have every module with the library's input size (same base model)."""
    from .hf_models import targeted_linears

    want = {m.name: m.d_in for m in info.modules}
    found = targeted_linears(model, list(modules))
    for m in modules:
        layer = found.get(m)
        d_in = getattr(getattr(layer, "base_layer", layer), "in_features", None)
        if d_in != want[m]:
            raise ValueError(f"the model does not match library {info.name!r} ({info.base_model}): module {m} "
                             f"has input size {d_in}, the library {want[m]}; pass the library's base model with --model")


def sequences(model, tokenizer, texts: Iterable[str], info: LibraryInfo, forms: Mapping[str, str], *,
              max_tokens: int) -> Iterator[dict[str, np.ndarray]]:
    """One ``{module: array}`` per text, in ``forms``; equal activations are one array object,
    kept as float16 when that is finite (half the memory; models run at that precision)."""
    from .hf_host import capture_inputs, group_shared_inputs, project

    modules = list(forms)
    for text in texts:
        x = capture_inputs(model, text, modules=modules, tokenizer=tokenizer, max_length=max_tokens)
        groups = group_shared_inputs(x)
        kept = {g: _compact(x[g]) for g in {groups[m] for m in modules if forms[m] == "activations"}}
        seq = {m: kept[groups[m]] for m in modules if forms[m] == "activations"}
        proj = [m for m in modules if forms[m] == "projected"]
        if proj:
            seq.update(project({m: x[m] for m in proj}, {m: info.shared_a[m] for m in proj}))
        yield seq


def _compact(x: np.ndarray) -> np.ndarray:
    half = x.astype(np.float16)
    return half if np.isfinite(half).all() else x


def nbytes(seq: Mapping[str, np.ndarray]) -> int:
    """Bytes of one captured sequence (shared arrays counted once)."""
    return sum(a.nbytes for a in {id(a): a for a in seq.values()}.values())


def calibrate_from_texts(connect: Callable[[], object], library: str, paths: Sequence[str], *, model: str,
                         cache_dir=None, form: str = "auto", max_tokens: int = 128, chunk_chars: int = 600,
                         limit: int | None = None, max_memory_mb: int = 4096, deadline: float = 3600.0,
                         progress: bool = True) -> CalibrationResult:
    """Read the texts, capture them on ``model`` (progress bar), then stream the library's
    Calibrate on a fresh connection from ``connect()`` (a RouterClient).

    Capture comes first and the stream after it because the server closes connections at its
    max connection age (5 min + 30 s grace): a stream fed at the speed of a forward pass on a
    busy host would be cut. ``max_memory_mb`` bounds what the captures may hold.
    """
    from tqdm import tqdm

    from .hf_models import load_model

    with connect() as client:
        info = client.describe(library, include_shared_a=True)
    forms = module_forms(info, form=form)
    if not forms:
        raise SystemExit(f"library {library!r} has no adapters to calibrate; upload some first")
    texts = read_texts(paths, chunk_chars=chunk_chars)[:limit]
    if not texts:
        raise SystemExit("no usable text in --texts")
    m, tok = load_model(model, cache_dir=cache_dir)
    check_model(m, info, forms)
    counts = {f: sum(1 for v in forms.values() if v == f) for f in set(forms.values())}
    if progress:
        print(f"calibrating {library} from {len(texts)} sequences of up to {max_tokens} tokens on {model}: "
              + ", ".join(f"{n} modules as {f}" for f, n in sorted(counts.items())), file=sys.stderr)
    captured: list[dict[str, np.ndarray]] = []
    with tqdm(texts, desc="capturing", unit="seq", disable=not progress or None) as bar:
        for seq in sequences(m, tok, bar, info, forms, max_tokens=max_tokens):
            captured.append(seq)
            if len(captured) == 1:      # the first one bounds them all (T <= max_tokens)
                per_token = nbytes(seq) / next(iter(seq.values())).shape[0]
                need = per_token * max_tokens * len(texts) / 2 ** 20
                if need > max_memory_mb:
                    raise ValueError(f"{len(texts)} sequences of up to {max_tokens} tokens need up to {need:.0f} MB "
                                     f"of captured inputs (limit {max_memory_mb}); lower --limit or --max-tokens, "
                                     "or raise --max-memory-mb")
    with connect() as client, tqdm(captured, desc=f"calibrating {library}", unit="seq",
                                   disable=not progress or None) as bar:
        return client.calibrate(bar, library=library, form=forms, timeout=deadline)
