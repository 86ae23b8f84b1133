"""Load a checkpoint of the LLaDA family in the Hugging Face layout onto a device, tensor by tensor.

The config picks the family (`weights.family`) and the family's network names the checkpoint
tensors it expects (`checkpoint_tensors()`: name -> the parameter, or the view of a fused/stacked
parameter, it is copied into). Mask and EOS ids come from config.json, else the tokenizer, else the
family's released ids.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from weights.family import family_of, read_config
from weights.fields import ConfigError
from weights.layers import DecoderLM
from weights.parallel import ParallelError, check_divisible, read_shard
from weights.tokenizer import Tokenizer

log = logging.getLogger("llada.weights")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message says which file or tensor and why."""


@dataclass
class SpecialIds:
    mask: int
    eos: int
    eot: int | None = None
    bos: int | None = None

    @property
    def stop(self) -> list[int]:
        """Ids that end an answer (the first one in the generated span cuts it)."""
        return [i for i in (self.eos, self.eot) if i is not None]


@dataclass
class ModelBundle:
    model: DecoderLM
    config: object  # the family's config (weights.family)
    tokenizer: Tokenizer | None
    special: SpecialIds
    path: Path
    name: str = field(default="")
    decoding: str = "llada"  # the checkpoint's own generate: "llada", "llada2.0" or "llada2.1"

    @property
    def vocab_size(self) -> int:
        """The one bound on token ids a client may send, [0, vocab_size): the tokenizer's vocabulary
        (the embedding table may be padded past it: LLaDA's is), else config.json's vocab_size;
        never past the embedding table, and always holding the special ids."""
        vocab = self.tokenizer.vocab_size if self.tokenizer is not None else self.config.vocab_size
        special = max(i for i in (self.special.mask, self.special.eos, self.special.eot) if i is not None)
        return min(max(vocab, special + 1), self.config.embedding_size)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype


def build_network(config, device: str | torch.device = "meta", dtype: torch.dtype | None = None,
                  tp=None) -> DecoderLM:
    """The family's network for `config`, its parameters uninitialised (on the meta device unless
    `device` is given); with `tp` (`weights.parallel.TensorParallel`) this rank's part of it."""
    with torch.device("meta"):
        model = family_of(config).network(config, tp=tp)
    if str(device) != "meta":
        model = model.to_empty(device=device)
    return model if dtype is None else model.to(dtype)


def checkpoint_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape, for any family's config, in the network's order."""
    return {name: tuple(t.shape) for name, t in build_network(cfg).checkpoint_tensors().items()}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("device 'cuda' was asked for but no CUDA GPU is available")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        # bf16 is the checkpoints' own dtype and the GPU's fast path; CPUs run fp32 best.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose auto, bfloat16, float16 or float32")
    return DTYPES[dtype]


def _roots(path: Path) -> list[Path]:
    """Where the files of the checkpoint directory `path` may lie: the directory itself and, for a
    Hugging Face hub cache snapshot (`<repo>/snapshots/<revision>`, its files links into
    `<repo>/blobs`), that repository's blobs."""
    root = path.resolve()
    roots = [root]
    if root.parent.name == "snapshots":
        roots.append((root.parent.parent / "blobs").resolve())
    return roots


def checkpoint_file(path: Path, name, what: str = "file") -> Path:
    """`path / name`, for a file the loader opens, kept inside the checkpoint directory: `name` is a
    plain relative name (no absolute path, no '..'), and the file, links followed, lies in the
    directory (or, for a hub cache snapshot, in its repository's blobs). CheckpointError otherwise."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{path}: {what} name {name!r} is not a file name")
    rel = Path(name)
    if rel.is_absolute() or rel.drive or ".." in rel.parts or "\\" in name:
        raise CheckpointError(f"{path}: {what} {name!r} is outside the checkpoint directory (names must be "
                              "relative to it, without '..')")
    full = path / rel
    real = full.resolve()
    if not any(real == r or r in real.parents for r in _roots(path)):
        raise CheckpointError(f"{path}: {what} {name!r} is a link to {real}, outside the checkpoint directory")
    return full


def _weight_files(path: Path) -> dict[str, Path]:
    """Tensor name (with prefix) -> the safetensors file holding it."""
    index = checkpoint_file(path, "model.safetensors.index.json", "index")
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            items = weight_map.items()
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = {name: checkpoint_file(path, fname, f"{index.name} shard") for name, fname in items}
        for f in sorted(set(files.values())):
            if not f.exists():
                raise CheckpointError(f"{index} names shard {f.name}, which is missing from {path}")
        return files
    singles = [checkpoint_file(path, f.name, "weights file") for f in sorted(path.glob("*.safetensors"))]
    if not singles:
        raise CheckpointError(f"{path}: no *.safetensors weights and no model.safetensors.index.json")
    from safetensors import safe_open

    files = {}
    for f in singles:
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                files[name] = f
    return files


SMALL_MODEL_PARAMS = 100_000_000


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the platform has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _count_given(override: int | None) -> bool:
    """A thread count set from outside: --cpu-threads, LLADA_CPU_THREADS or OMP_NUM_THREADS."""
    return bool(override or os.environ.get("LLADA_CPU_THREADS") or os.environ.get("OMP_NUM_THREADS"))


def live_thread_counts(config, device: torch.device, override: int | None = None) -> tuple[int, ...]:
    """The counts the engine keeps choosing between while serving (sampler/thread_tuner.py): one
    thread and every core, where the start-up measures (a small model on a CPU with more than one
    core, no count given); otherwise none, and the count stays as set."""
    if device.type != "cpu" or _count_given(override) or config.num_parameters >= SMALL_MODEL_PARAMS \
            or available_cores() < 2:
        return ()
    return (1, available_cores())


def pick_cpu_threads(config, device: torch.device, model=None, override: int | None = None,
                     batch: int = 1) -> int:
    """Set torch's intra-op threads for serving this model on this device; returns the count.

    An explicit count wins: `override` (the server's --cpu-threads), else LLADA_CPU_THREADS, else
    OMP_NUM_THREADS (torch has already read it). Otherwise small models are measured when `model` is
    given (`measure_cpu_threads`, at the server's `batch`: its running requests per step), and
    guessed without it: one thread, as each operation is too small to split and OpenMP's barrier
    spinning collapses when another process holds a core. Large models keep torch's default. Where
    it measures, the server's engine keeps choosing while serving (`live_thread_counts`)."""
    if device.type != "cpu":
        return torch.get_num_threads()
    want = override or os.environ.get("LLADA_CPU_THREADS")
    if want:
        n = max(1, int(want))
    elif os.environ.get("OMP_NUM_THREADS") or config.num_parameters >= SMALL_MODEL_PARAMS:
        return torch.get_num_threads()
    elif model is not None and available_cores() > 1:
        n = measure_cpu_threads(model, available_cores(), batch=batch)
    else:
        n = 1
    torch.set_num_threads(n)
    return n


MEASURE_BATCH = 8  # canvases in the batched forward timed at start-up (at most; fewer if the server runs fewer)


def _time_forwards(model, shapes, counts, rounds: int, budget_s: float) -> dict:
    """(count, shape) -> the forward times of `model` on zero ids of `shape`, each count in turn per
    round (a warm-up round first, untimed); rounds stop early once `budget_s` is spent (2 at least)."""
    import time

    times = {(n, s): [] for n in counts for s in shapes}
    start = time.perf_counter()
    with torch.inference_mode():
        for r in range(rounds + 1):
            for s in shapes:
                ids = torch.zeros(s, dtype=torch.int64)
                for n in counts:
                    torch.set_num_threads(n)
                    t0 = time.perf_counter()
                    model.full_logits(ids)
                    if r:  # round 0 warms up each count and shape
                        times[(n, s)].append(time.perf_counter() - t0)
            if r >= 2 and time.perf_counter() - start > budget_s:
                break
    return times


def measure_cpu_threads(model, cores: int, tokens: int = 64, rounds: int = 7, batch: int = MEASURE_BATCH,
                        budget_s: float = 4.0) -> int:
    """Time forwards of `model` on 1 and on `cores` intra-op threads, alternating (the median of
    `rounds` each after a warm-up), at the two sizes the server runs: one canvas of `tokens` tokens
    (a request alone) and min(`batch`, 8) canvases in one forward (the batched step concurrent
    requests share). The many win when the batched forward is at least 10% faster on them and the
    single canvas no more than 5% slower: throughput under load counts most, and on a shared
    machine one thread degrades gracefully while more collapse at OpenMP's barriers."""
    import statistics

    tokens = max(1, min(tokens, int(model.config.max_sequence_length)))
    b = max(1, min(batch, MEASURE_BATCH))
    shapes = [(1, tokens)] + ([(b, tokens)] if b > 1 else [])
    times = _time_forwards(model, shapes, (1, cores), rounds, budget_s)
    med = {k: statistics.median(v) for k, v in times.items()}
    one, many = shapes[0], shapes[-1]
    wins = med[(cores, many)] < 0.9 * med[(1, many)] and med[(cores, one)] <= 1.05 * med[(1, one)]
    pick = cores if wins else 1
    said = f"a {tokens}-token forward takes {med[(1, one)] * 1e3:.2f} ms on 1 thread, " \
           f"{med[(cores, one)] * 1e3:.2f} ms on {cores}"
    if b > 1:
        said += f"; {b} such canvases in one forward {med[(1, many)] * 1e3:.2f} ms on 1, " \
                f"{med[(cores, many)] * 1e3:.2f} ms on {cores}"
    log.info("CPU threads: %s; using %d (--cpu-threads overrides)", said, pick)
    return pick


def _copy_tensors(path: Path, by_file: dict, targets: dict, shards: dict, tp, dev, dt, progress) -> None:
    """Copy each checkpoint tensor (the rank's slice under `tp`) into its target, file by file,
    checking its shape against config.json's (a tqdm bar for checkpoints over about 1 GB)."""
    from safetensors import safe_open

    total = sum(t.numel() for t in targets.values())
    if progress is None:
        progress = total * 2 > 1 << 30  # a bar for checkpoints over about 1 GB
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(targets), desc=f"loading {path.name}", unit="tensor")
    with torch.no_grad():
        for f, names in by_file.items():
            try:
                handle = safe_open(str(f), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from None
            with handle:
                available = set(handle.keys())
                for full in names:
                    if full not in available:
                        raise CheckpointError(f"{f}: tensor {full} is listed in the index but absent")
                    shape = tuple(handle.get_slice(full).get_shape())
                    want = tuple(targets[full].shape)
                    shard = shards[full]
                    if shard is not None:  # the checkpoint's size along the split dimension
                        want = tuple(n * tp.size if d == shard.dim else n for d, n in enumerate(want))
                    if shape != want:
                        raise CheckpointError(
                            f"{f}: tensor {full} has shape {list(shape)}, expected {list(want)} "
                            f"from config.json")
                    targets[full].copy_(read_shard(handle, full, shard, tp).to(device=dev, dtype=dt))
                    if bar is not None:
                        bar.update(1)
    if bar is not None:
        bar.close()


def load_checkpoint(path, device="auto", dtype="auto", progress: bool | None = None,
                    tp=None) -> ModelBundle:
    """Config, weights (tensor by tensor, straight to `device` in `dtype`, each into its parameter or
    its view of a fused or stacked one) and tokenizer of a checkpoint directory. With `tp`
    (`weights.parallel.TensorParallel`, size > 1) the rank builds its part of the network and reads
    only its slices of each tensor (`get_slice`); a size that does not divide a sharded dimension
    is a CheckpointError naming the field and the sizes that work."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a checkpoint in the Hugging Face layout)")
    try:
        config = read_config(checkpoint_file(path, "config.json"))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if tp is not None and tp.size <= 1:
        tp = None
    if tp is not None:
        try:
            check_divisible(config, tp.size)
        except ParallelError as e:
            raise CheckpointError(f"{path}: {e}") from None
    files = _weight_files(path)

    model = build_network(config, dev, dt, tp)
    targets = model.checkpoint_tensors()
    shards = model.checkpoint_shards()

    by_file: dict[Path, list[str]] = {}
    for full in targets:
        if full not in files:
            raise CheckpointError(f"{path}: tensor {full} is missing from the checkpoint")
        by_file.setdefault(files[full], []).append(full)

    _copy_tensors(path, by_file, targets, shards, tp, dev, dt, progress)
    model.eval()
    model.requires_grad_(False)

    for name in ("tokenizer.json", "tokenizer_config.json"):
        checkpoint_file(path, name)
    tokenizer = Tokenizer.from_dir(path)
    special = special_ids(config, tokenizer, path)
    if tokenizer is not None:
        tokenizer.mask_token = tokenizer.id_to_token(special.mask)  # text never becomes the mask id
    log.info("loaded %s (%s): %.1fM parameters (%.1fM active) on %s in %s", path, config.family,
             config.num_parameters / 1e6, config.active_parameters / 1e6, dev, str(dt).replace("torch.", ""))
    return ModelBundle(model=model, config=config, tokenizer=tokenizer, special=special, path=path,
                       name=path.name, decoding=released_decoding(config, path))


def released_decoding(config, path: Path) -> str:
    """Which `generate` the checkpoint ships: its family's, or the family's token-editing one when the
    checkpoint's remote code (modeling_*.py) has token editing (`editing_threshold`): LLaDA2.0 and 2.1
    share the network and the config."""
    fam = family_of(config)
    if fam.editing_decoding is None:
        return fam.decoding
    for f in sorted(path.glob("modeling_*.py")):
        try:
            checkpoint_file(path, f.name)
        except CheckpointError:
            continue  # a link out of the directory is not read
        try:
            if "editing_threshold" in f.read_text(errors="replace"):
                return fam.editing_decoding
        except OSError:
            continue
    return fam.decoding


def special_ids(config, tokenizer: Tokenizer | None, path: Path) -> SpecialIds:
    """Mask / EOS ids from config.json, else the tokenizer, else the family's released defaults;
    end-of-turn and BOS from the tokenizer."""
    fam = family_of(config)
    mask_text, eot_text = fam.mask_text, fam.eot_text
    mask, eos = config.mask_token_id, config.eos_token_id
    eot = bos = None
    if tokenizer is not None:
        if mask is None:
            mask = tokenizer.token_to_id(mask_text)
        if eos is None and "eos_token" in tokenizer.special_tokens:
            eos = tokenizer.token_to_id(tokenizer.special_tokens["eos_token"])
        eot = tokenizer.token_to_id(eot_text)
        bos_text = tokenizer.special_tokens.get("bos_token", "<|startoftext|>")
        bos = tokenizer.token_to_id(bos_text)
    mask = fam.default_mask_id if mask is None else mask
    eos = fam.default_eos_id if eos is None else eos
    for name, v in (("mask_token_id", mask), ("eos_token_id", eos)):
        if v is None:
            raise CheckpointError(f"{path}: no {name} in config.json and none in the tokenizer")
        if not 0 <= v < config.embedding_size:
            raise CheckpointError(f"{path}: {name}={v} is outside the vocabulary "
                                  f"(vocab_size={config.embedding_size}); set it in config.json")
    return SpecialIds(mask=mask, eos=eos, eot=eot, bos=bos)
