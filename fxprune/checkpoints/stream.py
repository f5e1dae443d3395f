"""A decoder-only language model run from its folder one decoder layer at a time (the SparseGPT / Wanda
sequential scheme, from the shards): memory holds one layer's weights and the text's hidden states, never the
model, so it does not grow with depth.

    build     the model class with its parameters on the meta device and its buffers real (rotary tables are
              computed at construction and are not in the checkpoint)
    capture   the modules outside the decoder layers (embedding, final norm, head) read from the shards; the
              layers replaced by stand-ins that record how the model calls each one (masks, positions, rotary
              tables) and pass the hidden states on; the embedding's output is the first layer's input
    layers    per decoder layer: its tensors read, every batch's hidden states run through it with the caller's
              forward hooks on its modules, its outputs kept as the next layer's inputs, its tensors let go
    tail      (perplexity) the stand-ins replay the last hidden states; the final norm and head give the logits

The decoder layers are the model's ``nn.ModuleList`` of ``num_hidden_layers`` modules of one class.
"""
from __future__ import annotations

import contextlib
import ctypes
import io
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .architecture import checkpoint_names, fused_sources, load_config, model_class
from .folder import Checkpoint, CheckpointError

__all__ = ["DecoderStream", "StreamResult", "Hook", "params_on_meta"]

Hook = Callable[[nn.Module, tuple, Any], None]  # a forward hook: (module, inputs, output)


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Modules built inside have every parameter on the meta device (no memory) and their buffers where they
    were computed: a parameter is moved to meta as it is registered, before any initialisation touches it."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


@dataclass
class StreamResult:
    """What one pass over the text measured: per decoder layer, the mean cosine similarity between its input and
    output hidden states (ShortGPT's block influence is 1 minus it; nan for a skipped layer); with the tail, the
    summed negative log-likelihood (nats) of the predicted tokens and their count."""

    cosine: list[float] = field(default_factory=list)
    nll: float = 0.0
    predicted: int = 0
    peak_loaded_bytes: int = 0   # the most tensor bytes read from the shards and held at once

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.predicted) if self.predicted else float("nan")


class _Stop(Exception):
    """Raised by the last stand-in: the capture has what it needs, the head need not run."""


class _Stand(nn.Module):
    """A decoder layer's stand-in: records the call (positional arguments after the hidden states, keywords), and
    returns the hidden states it is given, or ``replay`` in their place, in the layer's own output form."""

    def __init__(self, calls: list, tuple_out: bool, replay: torch.Tensor | None = None, stop: bool = False) -> None:
        super().__init__()
        self.calls, self.tuple_out, self.replay, self.stop = calls, tuple_out, replay, stop

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.calls.append((args[1:], kwargs))
        if self.stop:
            raise _Stop
        out = hidden if self.replay is None else self.replay
        return (out,) if self.tuple_out else out


class DecoderStream:
    """A decoder-only language model folder, run layer by layer (see the module's doc). ``dtype``: the compute
    dtype (default: the checkpoint's when it is float32 or float64, else float32)."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype | None = None) -> None:
        self.ckpt, self.config = ckpt, load_config(ckpt.root)
        if hasattr(self.config, "use_cache"):
            self.config.use_cache = False
        self.dtype = dtype or _compute_dtype(ckpt)
        if self.dtype == torch.float64 and hasattr(self.config, "_experts_implementation"):
            self.config._experts_implementation = "eager"  # transformers' grouped kernel has no float64
        cls = model_class(self.config)
        with params_on_meta(), contextlib.redirect_stderr(io.StringIO()):
            self.model = cls(self.config).eval()
        self.names = checkpoint_names(self.model, ckpt)
        self.fused = fused_sources(self.model, ckpt)  # expert tensors assembled from one per expert
        self.path, self.layers = _decoder_layers(self.model, self.config)
        self._held = self.peak = 0
        self.eager_outside = False  # the modules outside the layers all read at once (see _outside)

    # --- the three steps ------------------------------------------------------------------------------------

    def run(self, batches: list[torch.Tensor], hooks: Mapping[str, Hook] | None = None, *,
            skip: Iterable[int] = (), tail: bool = False,
            after_layer: Callable[[str, nn.Module], None] | None = None) -> StreamResult:
        """Run the token-id ``batches`` through the model layer by layer; ``hooks``: module name -> forward hook,
        registered while its module runs; ``skip``: decoder layers passed over (their input is the next one's);
        ``tail``: also run the head and sum the next-token negative log-likelihood; ``after_layer(prefix,
        layer)``: called once a layer has run every batch, its tensors still loaded."""
        hooks, skip = dict(hooks or {}), set(skip)
        self._held = self.peak = 0
        result = StreamResult()
        hidden, calls, tuple_out = self._capture(batches)
        for i, layer in enumerate(self.layers):
            if i in skip:
                result.cosine.append(float("nan"))
                continue
            prefix = f"{self.path}.{i}"
            with self._loaded(prefix, layer), torch.no_grad():
                with self._hooked(prefix, layer, hooks):
                    result.cosine.append(self._through(layer, hidden, [c[i] for c in calls]))
                if after_layer is not None:
                    after_layer(prefix, layer)
            release_freed_memory()
        if tail:
            result.nll, result.predicted = self._tail(batches, hidden, tuple_out, hooks)
        result.peak_loaded_bytes = self.peak
        return result

    def rewrite(self, batches: list[torch.Tensor], edit: Callable[[LayerRun], Mapping[str, torch.Tensor]]) \
            -> Iterator[tuple[str, torch.Tensor]]:
        """Rewrite the model layer by layer: for each decoder layer, ``edit(run)`` may run it on the original
        model's hidden states and on the rewritten model's (:class:`LayerRun`), change its loaded tensors in place
        and return the new ones (model name -> tensor), which are yielded; the rewritten model's hidden states then
        advance through the changed layer, the original's through the original one."""
        self._held = self.peak = 0
        original, calls, _ = self._capture(batches)
        rewritten = list(original)
        for i, layer in enumerate(self.layers):
            prefix = f"{self.path}.{i}"
            with self._loaded(prefix, layer), torch.no_grad():
                run = LayerRun(self, prefix, layer, original, rewritten, [c[i] for c in calls])
                ahead = run.outputs(original, {})  # before the edit changes the layer
                new = edit(run)
                rewritten[:] = run.outputs(rewritten, {})
                original[:] = ahead
            yield from new.items()
            release_freed_memory()

    def _capture(self, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[list], bool]:
        """Each batch's first hidden states and every layer's call, per batch; whether layers return tuples
        (older transformers) or the hidden states (newer): the first layer is run once on the first batch to see,
        with the modules outside the layers let go meanwhile (one of the two is held at a time)."""
        first: list = []
        seen: list = []
        with self._outside(), torch.no_grad():
            self._with_stands([_Recording(first, False, seen, stop=True)], batches[0])
        if seen[0].device.type == "meta":  # a module read another's tensors outside that one's forward
            self.eager_outside = True
            first, seen = [], []
            with self._outside(), torch.no_grad():
                self._with_stands([_Recording(first, False, seen, stop=True)], batches[0])
        with self._loaded(f"{self.path}.0", self.layers[0]), torch.no_grad():
            args, kwargs = first[0]
            tuple_out = isinstance(self.layers[0](seen[0].to(self.dtype), *args, **kwargs), tuple)
        hidden, calls = [], []
        last = len(self.layers) - 1
        with self._outside(), torch.no_grad():
            for ids in batches:
                per_layer: list[list] = [[] for _ in self.layers]
                seen = []
                stands: list[nn.Module] = [_Stand(c, tuple_out, stop=k == last) for k, c in enumerate(per_layer)]
                stands[0] = _Recording(per_layer[0], tuple_out, seen, stop=last == 0)
                self._with_stands(stands, ids)
                hidden.append(seen[0].to(self.dtype))
                calls.append([c[0] for c in per_layer])
        return hidden, calls, tuple_out

    def _through(self, layer: nn.Module, hidden: list[torch.Tensor], calls: list) -> float:
        """Every batch through ``layer`` (in place in ``hidden``); the mean cosine of input and output."""
        out = _forward(layer, hidden, calls)
        cos = [torch.nn.functional.cosine_similarity(h.float(), o.float(), dim=-1).double()
               for h, o in zip(hidden, out)]
        hidden[:] = out
        return float(sum(c.sum() for c in cos)) / max(sum(c.numel() for c in cos), 1)

    def _tail(self, batches: list[torch.Tensor], hidden: list[torch.Tensor], tuple_out: bool,
              hooks: dict[str, Hook]) -> tuple[float, int]:
        nll, predicted = 0.0, 0
        with self._outside(), self._hooked("", self.model, hooks, outside=True), torch.no_grad():
            for ids, h in ((i[r:r + 1], h[r:r + 1]) for i, h in zip(batches, hidden) for r in range(len(i))):
                # one sequence at a time: its logits are (length x vocabulary), large for a large vocabulary
                stands = [_Stand([], tuple_out, replay=h if k == len(self.layers) - 1 else None)
                          for k in range(len(self.layers))]
                logits = self._with_stands(stands, ids).logits[0, :-1]
                nll += float(torch.nn.functional.cross_entropy(logits.double(), ids[0, 1:], reduction="sum"))
                predicted += ids.shape[1] - 1
        return nll, predicted

    # --- helpers ---------------------------------------------------------------------------------------------

    def _with_stands(self, stands: list[nn.Module], ids: torch.Tensor) -> Any:
        """The model called on ``ids`` with its decoder layers replaced by ``stands`` (put back after)."""
        originals = list(self.layers)
        for k, s in enumerate(stands):
            self.layers[k] = s
        try:
            return self.model(input_ids=ids)
        except _Stop:
            return None
        finally:
            for k, m in enumerate(originals):
                self.layers[k] = m

    @contextlib.contextmanager
    def _loaded(self, prefix: str, module: nn.Module, direct: bool = False) -> Iterator[None]:
        """``module``'s parameters (and saved buffers) read from the shards for the duration (``direct``: its own,
        not its children's), in the compute dtype; an embedding table in the checkpoint's own (a lookup converts
        the rows it returns exactly as converting the table would, and the table is often the largest tensor).
        Tied parameters are read once."""
        stored = direct and isinstance(module, nn.Embedding)
        cast = module.register_forward_hook(self._to_compute_dtype) if stored else None
        owners = [("", module)] if direct else list(module.named_modules(remove_duplicate=False))
        swapped: list[tuple[nn.Module, str, Any, bool]] = []
        by_id: dict[int, Any] = {}
        nbytes = 0
        try:
            for name, owner in owners:
                for leaf, t in list(owner._parameters.items()) + list(owner._buffers.items()):
                    if t is None:
                        continue
                    full = ".".join(p for p in (prefix, name, leaf) if p)
                    is_param = leaf in owner._parameters
                    if id(t) not in by_id:
                        value = self._read(full, is_param, stored)
                        if value is None:
                            continue
                        by_id[id(t)] = nn.Parameter(value, requires_grad=False) if is_param else value
                        nbytes += value.numel() * value.element_size()
                        self._held += value.numel() * value.element_size()
                    store = owner._parameters if is_param else owner._buffers
                    swapped.append((owner, leaf, t, is_param))
                    store[leaf] = by_id[id(t)]
            self.peak = max(self.peak, self._held)
            yield
        finally:
            for owner, leaf, t, is_param in reversed(swapped):
                (owner._parameters if is_param else owner._buffers)[leaf] = t
            self._held -= nbytes
            if cast is not None:
                cast.remove()

    def _to_compute_dtype(self, module: nn.Module, args: Any, out: Any) -> Any:
        """An embedding's rows in the compute dtype, before anything reads them (rotary tables and masks take
        their dtype from the embeddings)."""
        return out.to(self.dtype) if isinstance(out, torch.Tensor) and out.is_floating_point() else out

    @contextlib.contextmanager
    def _outside(self) -> Iterator[None]:
        """The modules outside the decoder layers (embedding, final norm, head) each read from the shards as it
        runs and let go after its forward, so that one of them is held at a time; all at once for a model where a
        module reads another's tensors outside that one's forward (``eager_outside``: found by the capture)."""
        outside = [(name, m) for name, m in self.model.named_modules()
                   if not _under(name, self.path) and (m._parameters or m._buffers)]
        if self.eager_outside:
            with contextlib.ExitStack() as stack:
                for name, m in outside:
                    stack.enter_context(self._loaded(name, m, direct=True))
                yield
            return
        stacks: dict[str, contextlib.ExitStack] = {}

        def before(name: str) -> Callable:
            def hook(module: nn.Module, args: Any) -> None:
                stacks[name] = contextlib.ExitStack()
                stacks[name].enter_context(self._loaded(name, module, direct=True))
            return hook

        def after(name: str) -> Callable:
            def hook(module: nn.Module, args: Any, out: Any) -> None:
                stacks.pop(name).close()
            return hook

        handles = []
        for name, m in outside:
            handles += [m.register_forward_pre_hook(before(name)), m.register_forward_hook(after(name))]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for stack in stacks.values():
                stack.close()

    def _read(self, name: str, is_param: bool, stored: bool = False) -> torch.Tensor | None:
        key = self.names.get(name)
        if stored and key is not None:
            return self.ckpt.read_kept(key, None)
        if key is None and name in self.fused:  # a layer's experts, stacked as transformers assembles them
            return self.fused[name].assemble(self._read_key)
        if key is None:
            if is_param:
                raise CheckpointError(f"{self.ckpt.root}: {name} is not one tensor of the checkpoint, and transformers "
                                      "assembles it in a way fxprune does not know: load the model in a model file "
                                      "to calibrate it in memory")
            return None  # a buffer computed at construction (rotary frequencies), or one that is not saved
        return self._read_key(key)

    def _read_key(self, key: str) -> torch.Tensor:
        info = self.ckpt.tensors[key]
        return self.ckpt.read_kept(key, None, dtype=self.dtype if info.dtype.is_floating_point else None)

    @contextlib.contextmanager
    def _hooked(self, prefix: str, module: nn.Module, hooks: dict[str, Hook], outside: bool = False) \
            -> Iterator[None]:
        handles = []
        for name, m in module.named_modules():
            full = ".".join(p for p in (prefix, name) if p)
            if full in hooks and not (outside and _under(full, self.path)):
                handles.append(m.register_forward_hook(hooks[full]))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


class LayerRun:
    """One decoder layer of :meth:`DecoderStream.rewrite`, loaded: run it with forward hooks on its modules, on
    the original model's hidden states (``original``: call it before changing the layer) or on the rewritten
    model's (``rewritten``: the layers before already rewritten). ``root``: the whole model, this layer's tensors
    loaded (the others on meta)."""

    def __init__(self, stream: DecoderStream, prefix: str, layer: nn.Module, original: list[torch.Tensor],
                 rewritten: list[torch.Tensor], calls: list) -> None:
        self.stream, self.prefix, self.layer = stream, prefix, layer
        self._original, self._rewritten, self._calls = original, rewritten, calls
        self.root = stream.model

    def original(self, hooks: Mapping[str, Hook]) -> None:
        """The layer on the original model's hidden states, with ``hooks`` (call it before any change)."""
        self.outputs(self._original, hooks)

    def rewritten(self, hooks: Mapping[str, Hook]) -> None:
        """The layer as changed so far on the rewritten model's hidden states, with ``hooks``."""
        self.outputs(self._rewritten, hooks)

    def outputs(self, hidden: list[torch.Tensor], hooks: Mapping[str, Hook]) -> list[torch.Tensor]:
        with self.stream._hooked(self.prefix, self.layer, dict(hooks)):
            return _forward(self.layer, hidden, self._calls)


class _Recording(_Stand):
    """The first layer's stand-in, which also keeps the hidden states it is given (the embedding's output)."""

    def __init__(self, calls: list, tuple_out: bool, seen: list, stop: bool = False) -> None:
        super().__init__(calls, tuple_out, stop=stop)
        self.seen = seen

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.seen.append(args[0] if args else kwargs["hidden_states"])
        return super().forward(*args, **kwargs)


def _forward(layer: nn.Module, hidden: list[torch.Tensor], calls: list) -> list[torch.Tensor]:
    """Each batch's hidden states through ``layer``, called as the model called it (``calls``: per batch)."""
    out = []
    for h, (args, kwargs) in zip(hidden, calls):
        y = layer(h, *args, **kwargs)
        out.append(y[0] if isinstance(y, tuple) else y)
    return out


def release_freed_memory() -> None:
    """Hand the memory freed by a layer back to the system (glibc's ``malloc_trim``; nothing elsewhere). A layer's
    tensors and activations are freed after it runs, but glibc keeps freed blocks of some sizes in its heap, and
    over tens of layers the process grew by ~15 MB a layer (measured on a 22-layer 1.1 B checkpoint)."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else False
        except OSError:
            _LIBC = False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def _decoder_layers(model: nn.Module, config: Any) -> tuple[str, nn.ModuleList]:
    """The model's decoder layers: its ``nn.ModuleList`` of ``num_hidden_layers`` modules of one class (the
    one with the most parameters, if several)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == n and len({type(x) for x in m}) == 1]
    if getattr(config, "is_encoder_decoder", False) or not found:
        raise CheckpointError(f"{type(model).__name__}: fxprune runs decoder-only language models layer by layer "
                              f"(a list of num_hidden_layers={n} decoder layers), and found none here: load it in "
                              "a model file to calibrate it in memory")
    name, layers = max(found, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))
    return name, layers


def _compute_dtype(ckpt: Checkpoint) -> torch.dtype:
    floats = {t.dtype for t in ckpt.tensors.values() if t.dtype.is_floating_point}
    return torch.float64 if floats == {torch.float64} else torch.float32


def _under(name: str, path: str) -> bool:
    return name == path or name.startswith(path + ".")

