"""The model side of `seqr host`: one transformers model with its PEFT adapters, prompts to
token ids, and streamed generation with whatever :class:`~seqr_client.host_routing.Served`
says (one adapter, a weighted mix, or the base model with adapters off).

One generation runs at a time: PEFT's active adapter is state of the whole model, so capture,
apply and generate hold :attr:`Engine.lock`. Generation runs in its own thread and streams
text through a queue; the consumer can cancel it at any token (client gone, stop string hit).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from pathlib import Path
from typing import Iterator, Mapping

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .errors import InvalidArgumentError
from .hf_host import apply_decision, load_adapters
from .host_routing import Served
from .openai_schema import StopFilter
from .router_client import read_peft_dir


def load_model(spec: str):
    """``(model, tokenizer)``: ``smollm2`` (the packaged SmolLM2-135M-Instruct), ``tiny`` (a tiny
    random Llama, for smoke tests) or the path of a local Hugging Face causal-LM folder."""
    from . import hf_models
    if spec == "smollm2":
        return hf_models.load_smollm2()
    if spec == "tiny":
        return hf_models.tiny_llama()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise InvalidArgumentError(f"{path}: not a Hugging Face model folder (no config.json); use a local "
                                   "folder, 'smollm2' or 'tiny'", field="model", actual=spec)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok


def adapter_folders(root: str | Path | None = None, pairs: list[str] = ()) -> dict[str, Path]:
    """``{name: folder}`` from a folder of PEFT adapter folders (name = folder name, as
    `seqr adapters put` names them) and/or ``NAME=PATH`` pairs. Every folder must be one the
    service accepts (safetensors; pickles are refused)."""
    out: dict[str, Path] = {}
    if root is not None:
        if not Path(root).is_dir():
            raise InvalidArgumentError(f"{root}: no such folder of adapter folders", field="adapters",
                                       actual=str(root))
        for sub in sorted(Path(root).iterdir()):
            if (sub / "adapter_config.json").is_file():
                out[sub.name] = sub
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise InvalidArgumentError(f"--adapter takes NAME=PATH, got {pair!r}", field="adapter", actual=pair)
        out[name] = Path(path)
    for folder in out.values():
        read_peft_dir(folder)                  # AdapterFolderError: pickles, missing files
    return out


class _TextQueue(BaseStreamer):
    """Generated text as a queue of pieces that add up to exactly the decode of all generated
    tokens. Each step decodes everything generated so far and sends the new part, holding
    back a trailing U+FFFD: the first bytes of a character whose other bytes are still coming
    (byte-level tokenizers split characters across tokens)."""

    _END = object()

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], 0
        self._queue: queue.Queue = queue.Queue()
        self._prompt, self._ended = True, False

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def put(self, value) -> None:
        if self._prompt:                  # generate() hands over the prompt first
            self._prompt = False
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self._decode()
        stable = len(text.rstrip("\ufffd"))
        if stable > self.sent:
            self._queue.put(text[self.sent:stable])
            self.sent = stable

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        text = self._decode()
        if len(text) > self.sent:
            self._queue.put(text[self.sent:])
        self._queue.put(self._END)

    def __iter__(self) -> Iterator[str]:
        while (piece := self._queue.get()) is not self._END:
            yield piece


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Engine:
    def __init__(self, model, tokenizer, adapters: Mapping[str, Path]):
        self.tokenizer = tokenizer
        self.adapters = dict(adapters)
        self.model = load_adapters(model, self.adapters) if self.adapters else model
        self.peft = self.model if self.adapters else None
        self.lock = threading.Lock()
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 0)

    # ------------------------------------------------------------------ prompts
    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            # Control tokens inside messages are encoded as text: a user cannot forge a turn.
            enc = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          sanitize_control_tokens=True)
            return list(enc["input_ids"])
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return list(tok(text)["input_ids"])

    def prompt_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    # ------------------------------------------------------------------ generation
    @contextlib.contextmanager
    def _using(self, served: Served):
        if self.peft is None:
            yield self.model
        elif not served.adapters:
            with self.peft.disable_adapter():
                yield self.peft
        else:
            apply_decision(self.peft, [n for n, _, _ in served.adapters], [w for _, _, w in served.adapters])
            yield self.peft

    def generate(self, ids: list[int], *, served: Served, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stops: list[str] = ()) -> "Generation":
        return Generation(self, ids, served=served, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, seed=seed, stops=list(stops))


class Generation:
    """Iterate for text pieces (stop strings already cut); then ``finish_reason`` ("stop" |
    "length") and ``completion_tokens`` are set. ``cancel()`` stops it at the next token."""

    def __init__(self, engine: Engine, ids: list[int], *, served: Served, max_new_tokens: int,
                 temperature: float, top_p: float, seed: int | None, stops: list[str]):
        self.engine, self.ids, self.served, self.max_new_tokens = engine, ids, served, max_new_tokens
        self.finish_reason, self.completion_tokens = "length", 0
        self._filter = StopFilter(stops)
        self._cancel = threading.Event()
        self._error: BaseException | None = None
        self._eos = False
        self._streamer = _TextQueue(engine.tokenizer)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 \
            else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        self._thread = threading.Thread(target=self._run, args=(sampling, seed), daemon=True,
                                        name="seqr-host-generate")
        self._thread.start()

    def _run(self, sampling: dict, seed: int | None) -> None:
        eng, tok = self.engine, self.engine.tokenizer
        try:
            with eng.lock:
                if self._cancel.is_set():          # the client left while waiting for the model
                    return
                with eng._using(self.served) as model, torch.no_grad():
                    if seed is not None:
                        torch.manual_seed(seed)     # global RNG: fine, generations are serialised
                    x = torch.tensor([self.ids], dtype=torch.long)
                    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                         max_new_tokens=self.max_new_tokens, pad_token_id=tok.pad_token_id,
                                         streamer=self._streamer,
                                         stopping_criteria=StoppingCriteriaList([_Cancelled(self._cancel)]),
                                         **sampling)
            new = out[0, x.shape[1]:]
            self.completion_tokens = int(new.shape[0])
            eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
                else tok.eos_token_id
            eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
            self._eos = bool(new.numel()) and int(new[-1]) in eos
        except BaseException as e:    # noqa: BLE001 - handed to the consumer's thread, re-raised there
            self._error = e
        finally:
            self._streamer.end()          # the consumer never waits on a dead generation

    def __iter__(self) -> Iterator[str]:
        for piece in self._streamer:
            out = self._filter.feed(piece)
            if self._filter.stopped:
                self._cancel.set()
            if out:
                yield out
        self._thread.join()
        if self._error is not None:
            raise self._error
        tail = self._filter.flush()
        if tail:
            yield tail
        stopped = self._filter.stopped or self._eos
        self.finish_reason = "stop" if stopped or self.completion_tokens < self.max_new_tokens else "length"

    def cancel(self) -> None:
        self._cancel.set()

    def text(self) -> str:
        return "".join(self)
