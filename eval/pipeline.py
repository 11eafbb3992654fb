"""The evaluation pipeline's service half, shared by bench/evaluate.py (SmolLM2, 9 real domains)
and tests/e2e/test_eval_pipeline.py (a tiny random Llama, synthetic domains).

Everything goes through the real service and the real client: a server from
``seqr_server.app.create_server`` on 127.0.0.1:0 over a temporary encrypted store, libraries
created and adapters uploaded with :class:`seqr_client.RouterClient`, calibration streamed through
``Calibrate``, every sample routed with ``Route``. Model-side work (capture, perplexity,
generation) uses the model-host helpers of ``seqr_client.hf_host``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from seqr_client import RouterClient
from seqr_client import wire as cwire
from seqr_router.v1 import router_pb2


# --------------------------------------------------------------------------- server

@contextlib.contextmanager
def running_service(data_dir: str | os.PathLike | None = None, *, workers: int = 8,
                    max_message_mb: int = 64, max_tokens: int = 4096):
    """A real seqr server on 127.0.0.1:0 over an encrypted store in ``data_dir`` (a temporary
    folder by default, removed afterwards) with its own key file; yields ``(handles, client)``."""
    from seqr_server.app import create_server
    from seqr_server.config import KeySource, Limits, ServerConfig
    from seqr_server.store import init_key_file

    with contextlib.ExitStack() as stack:
        if data_dir is None:
            data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="seqr-eval-"))
        root = Path(data_dir)
        root.mkdir(parents=True, exist_ok=True)
        kek = root / "eval.kek"
        if not kek.exists():
            init_key_file(kek)
        cfg = ServerConfig(listen="127.0.0.1:0", data_dir=root / "data", metrics_port=None, demo=False,
                           keys=KeySource(key_file=kek), workers=workers, grace_s=2.0,
                           limits=Limits(max_message_bytes=max_message_mb << 20, max_tokens=max_tokens))
        _, handles = create_server(cfg)
        handles.start()
        if not handles.wait_ready(120):
            handles.stop(grace=0)
            raise RuntimeError(f"server did not become ready: {handles.load_error}")
        from seqr_client.channel import channel_options
        client = RouterClient(handles.target, timeout=120,
                              options=channel_options(max_message_bytes=max_message_mb << 20))
        try:
            yield handles, client
        finally:
            client.close()
            handles.stop(grace=1.0)


def register_library(client: RouterClient, name: str, *, signature, shared_a_seed: int, rank: int,
                     modules: Sequence[str], adapters: Mapping[str, os.PathLike],
                     progress: bool = False, allow_general: bool = False) -> dict[str, int]:
    """Create library ``name`` (shared A from the seed on ``modules``) and upload every adapter
    folder of ``adapters`` ({name: PEFT dir}) through PutAdapter. Returns {name: int id}.
    ``allow_general``: accept adapters with their own A (a mixed library)."""
    from tqdm import tqdm

    client.create_library(name, signature=signature, shared_a_seed=shared_a_seed, shared_a_rank=rank,
                          shared_a_modules=list(modules))
    ids = {}
    for n, d in tqdm(list(adapters.items()), desc=f"upload -> {name}", disable=not progress):
        ids[n] = client.put_adapter(d, name=n, library=name, allow_general=allow_general).adapter_id
    return ids


# --------------------------------------------------------------------------- inputs

def layer_inputs(x: np.ndarray, layers: Sequence[int], modules: Sequence[str]) -> dict[str, np.ndarray]:
    """Route inputs from one captured sample ``x`` (T, L, d): every module of a layer gets the
    *same* array object (q_proj and v_proj read one hidden state), so the client sends it once."""
    per_layer = {l: np.ascontiguousarray(x[:, k]) for k, l in enumerate(layers)}
    return {m: per_layer[int(m.split(".")[2])] for m in modules}


@dataclass(frozen=True)
class Setting:
    method: str
    normalisation: str = "frobenius"       # label: "none", "frobenius", "zscore/adapter/log", ...
    aggregation: str = "mean"
    library: str = ""                       # "" = the run's main library

    @property
    def label(self) -> str:
        s = f"{self.method} · {self.normalisation}"
        if self.aggregation != "mean":
            s += f" · {self.aggregation}"
        return s


@dataclass
class Routed:
    """Answers of one setting for every sample."""

    setting: Setting
    names: list[str]                        # top-1 adapter name per sample
    scores: list[dict]                      # all candidates' scores per sample
    margins: np.ndarray
    server_ms: np.ndarray                   # server-side total per request
    client_ms: np.ndarray                   # wall time seen by the client
    fallback: set = field(default_factory=set)
    normalisation_used: set = field(default_factory=set)


def route_all(client: RouterClient, library: str, samples: Sequence[Callable[[], dict]],
              setting: Setting, *, threads: int = 2, desc: str | None = None,
              progress: bool = False, **route_kw) -> Routed:
    """Route every sample (a thunk returning {module: array}) with one setting."""
    from tqdm import tqdm

    def one(k):
        inputs = samples[k]()
        t0 = time.perf_counter()
        r = client.route(library, inputs, method=setting.method, normalisation=setting.normalisation,
                         aggregation=setting.aggregation, include_scores=True, **route_kw)
        return r, (time.perf_counter() - t0) * 1e3

    with ThreadPoolExecutor(threads) as ex:
        out = list(tqdm(ex.map(one, range(len(samples))), total=len(samples),
                        desc=desc or setting.label, disable=not progress, leave=False))
    return Routed(setting=setting, names=[r.best.name for r, _ in out], scores=[dict(r.scores) for r, _ in out],
                  margins=np.array([r.margin for r, _ in out]),
                  server_ms=np.array([r.timings.total_ms for r, _ in out]),
                  client_ms=np.array([ms for _, ms in out]),
                  fallback={r.fallback for r, _ in out if r.fallback},
                  normalisation_used={r.normalisation for r, _ in out})


def calibrate(client: RouterClient, library: str, samples: Iterable[dict]):
    """Stream unlabeled sequences through LibraryAdmin.Calibrate."""
    return client.calibrate(samples, library=library)


def request_bytes(library: str, **inputs) -> int:
    """Serialized size of the RouteRequest the client would send (``inputs=`` / ``projected=`` /
    ``moments=``, ``tokens=``)."""
    req = router_pb2.RouteRequest(library=library)
    cwire.add_inputs(req, **inputs)
    return req.ByteSize()


# --------------------------------------------------------------------------- scoring

def domain_of(name: str) -> str:
    """Adapter name -> its domain: ``python`` and ``general-python`` are both python."""
    return name.split("-", 1)[1] if name.startswith("general-") else name


def accuracy(routed: Routed, labels: Sequence[str]) -> float:
    return float(np.mean([domain_of(n) == y for n, y in zip(routed.names, labels)]))


def confusion(routed: Routed, labels: Sequence[str], domains: Sequence[str]) -> np.ndarray:
    pos = {d: k for k, d in enumerate(domains)}
    c = np.zeros((len(domains), len(domains)), np.int64)
    for n, y in zip(routed.names, labels):
        c[pos[y], pos[domain_of(n)]] += 1
    return c


def agreement(a: Routed, b: Routed) -> tuple[float, float]:
    """(top-1 agreement, full-ranking agreement) between two settings, per sample."""
    top = np.mean([x == y for x, y in zip(a.names, b.names)])
    rank = np.mean([sorted(sa, key=lambda n: (-sa[n], n)) == sorted(sb, key=lambda n: (-sb[n], n))
                    for sa, sb in zip(a.scores, b.scores)])
    return float(top), float(rank)


# --------------------------------------------------------------------------- model side

def _text_key(t: str) -> str:
    return hashlib.sha256(t.encode()).hexdigest()[:24]


class NLLCache:
    """Per (adapter, text) summed token NLL, cached in a JSON file (adapters by recipe hash)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.data = {}
        if path is not None and path.is_file():
            self.data = json.loads(path.read_text())

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data))
            os.replace(tmp, self.path)


def adapter_key(adapter_dir) -> str:
    from seqr_client.training import read_seqr_json
    meta = read_seqr_json(adapter_dir) or {}
    return meta.get("recipe_hash") or hashlib.sha256(
        (Path(adapter_dir) / "adapter_model.safetensors").read_bytes()).hexdigest()[:20]


def sequence_nll(peft_model, tok, texts: Sequence[str], adapter: str | None, *, max_length: int = 256,
                 batch: int = 4) -> list[tuple[float, int]]:
    """(summed NLL, predicted tokens) of each text under ``adapter`` (None: the base model)."""
    import torch

    from seqr_client.hf_host import apply_decision

    ctx = peft_model.disable_adapter() if adapter is None else contextlib.nullcontext()
    if adapter is not None:
        apply_decision(peft_model, adapter)
    out = []
    with torch.no_grad(), ctx:
        for s in range(0, len(texts), batch):
            enc = tok(list(texts[s:s + batch]), return_tensors="pt", truncation=True, max_length=max_length,
                      padding=True)
            logits = peft_model(**enc, use_cache=False).logits[:, :-1].float()
            tgt = enc["input_ids"][:, 1:]
            m = enc["attention_mask"][:, 1:].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, reduction="none") * m
            out += [(float(a), int(b)) for a, b in zip(nll.sum(1), m.sum(1))]
    return out


def perplexities(peft_model, tok, texts: Sequence[str], choice: Sequence[str | None],
                 adapter_dirs: Mapping[str, os.PathLike], cache: NLLCache, *, max_length: int = 256,
                 progress: bool = False) -> list[tuple[float, int]]:
    """(NLL sum, tokens) of text k under adapter ``choice[k]`` (None = base), cached."""
    from tqdm import tqdm

    keys = {a: adapter_key(d) for a, d in adapter_dirs.items()}
    todo: dict[str | None, list[int]] = {}
    res: list = [None] * len(texts)
    for k, (t, a) in enumerate(zip(texts, choice)):
        ck = f"{keys[a] if a else 'base'}:{max_length}:{_text_key(t)}"
        if ck in cache.data:
            res[k] = tuple(cache.data[ck])
        else:
            todo.setdefault(a, []).append(k)
    bar = tqdm(total=sum(len(v) for v in todo.values()), desc="perplexity", disable=not progress or not todo)
    for a, ks in todo.items():
        for s in range(0, len(ks), 16):
            part = ks[s:s + 16]
            got = sequence_nll(peft_model, tok, [texts[k] for k in part], a, max_length=max_length)
            for k, v in zip(part, got):
                res[k] = v
                cache.data[f"{keys[a] if a else 'base'}:{max_length}:{_text_key(texts[k])}"] = list(v)
            bar.update(len(part))
        cache.save()
    bar.close()
    return res


def host_round_trip(peft_model, tok, client: RouterClient, library: str, prompt: str, *,
                    modules: Sequence[str] = ("q_proj", "v_proj"), max_length: int = 128,
                    max_new_tokens: int = 24, top_k: int = 1, **route_kw) -> dict:
    """What a model host does: capture → route (service) → set adapter → generate."""
    from seqr_client.hf_host import apply_decision, capture_inputs, generate_text, group_shared_inputs

    t0 = time.perf_counter()
    captured = capture_inputs(peft_model, prompt, modules=modules, tokenizer=tok, max_length=max_length)
    groups = group_shared_inputs(captured)
    t1 = time.perf_counter()
    r = client.route(library, {m: g for m, g in groups.items()},
                     shared={g: captured[g] for g in set(groups.values())}, top_k=top_k, **route_kw)
    t2 = time.perf_counter()
    names = [c.name for c in r.choices]
    active = apply_decision(peft_model, names if top_k > 1 else names[0],
                            [c.weight for c in r.choices] if top_k > 1 else None)
    text = generate_text(peft_model, tok, prompt, max_new_tokens=max_new_tokens)
    t3 = time.perf_counter()
    return {"choices": [(c.name, c.score, c.weight) for c in r.choices], "margin": r.margin,
            "active": active, "generated": text, "normalisation": r.normalisation,
            "capture_ms": (t1 - t0) * 1e3, "route_ms": (t2 - t1) * 1e3, "generate_ms": (t3 - t2) * 1e3}
