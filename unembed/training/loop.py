"""The one training loop. Each method contributes a `Task` (its batches, its loss, how it saves);
the loop owns everything else: device placement and mixed precision (accelerate), the learning-rate
schedule, weight decay (open_clip's parameter groups), gradient clipping, a NaN guard, progress,
streamed logs, atomic checkpoints and resume. The model is saved before the final validation, so a
validation that cannot run (no Java, out of memory) costs a warning, never the model.

Every step goes through accelerate's optimizer: under fp16 its grad scaler unscales, skips a step
whose gradients overflowed and lowers the scale; that is the scaler's job, not a bad step. A
non-finite loss stops every process at the same step (a flag all-reduced each step).

Determinism: the examples of step s are a pure function of (seed, s) — a seeded permutation per
epoch, and a per-step generator for any sampling the task does — and so is every other random draw
of the step (dropout): the global RNG, CPU and CUDA, is seeded from (seed, step, process) before each
step. A resumed run therefore computes exactly what an uninterrupted one would, on every process,
with no RNG state to carry in the checkpoint. The fp16 grad scaler's state is carried.

Distributed (several processes launched by `accelerate launch`): every process builds the same
global batch and keeps rows rank, rank+N, ...; the loss is rescaled by the process's share of the
batch's loss units (tokens, for captioning) so that DDP's gradient average equals the gradient of
the one-process loss on the whole batch. A loss that needs the whole batch's totals (CoCa's token
mean beside a row mean; SimCTG's mean over token pairs) gets them from `batch` as 0-d tensors, which
every process keeps whole, returns its own part of the one-process loss and counts one unit.
Contrastive losses gather every process's rows, however many each holds (a global batch of 33 on
2 processes). Same flags, same global batch, same weights.

Checkpoint layout, under OUT/checkpoints/:
    step-00000400/{model.safetensors, optimizer.safetensors, state.json (step, optimiser scalars,
                   config, grad scaler)}
    latest.json   {"step": 400, "dir": "step-00000400"}  (replaced atomically after the directory is complete)
    best/{model.safetensors, best.json (step, score)}  (with keep_best: the best validated weights so far)

With keep_best, each validation (validate_every) that beats the best score so far (the task's
`selection_score` of its validation) writes the model's weights to checkpoints/best/; at the end,
when the last step validates worse, the best weights replace the model before it is saved and
calibrated, and metrics.json says which step was kept. On disk, so a resumed run keeps its best.

With ema (a decay such as 0.999), the loop also keeps an exponential moving average of the trainable
weights (Polyak averaging, as timm's --model-ema and TensorFlow's ExponentialMovingAverage): after each
optimiser step, average <- d * average + (1 - d) * weights, with d = min(ema, (1 + n) / (10 + n)) at the
n-th update so that the first steps' random weights fade fast. Training itself is unchanged (the raw
weights follow the same path); validations, keep_best and the saved model read the average. It is
carried in each checkpoint (ema.safetensors), so a resumed run averages as an uninterrupted one.
Buffers (BatchNorm's running statistics) and frozen weights are the model's own.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from unembed.distributed import use_cpu
from unembed.errors import BadInputError, UnembedError
from unembed.io import load_module, load_tensors, read_json, save_module, save_tensors, staged_dir, write_json


class TrainingError(UnembedError):
    """Training cannot go on (non-finite loss, a checkpoint that does not match)."""


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 100
    max_steps: int = 0          # when > 0, overrides epochs
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    mixed_precision: str = "no"  # no | fp16 | bf16
    checkpoint_every: int = 500  # steps; a checkpoint is always written at the end too
    validate_every: int = 0      # steps; 0 = only at the end
    keep_checkpoints: int = 1
    max_bad_steps: int = 5       # steps in a row with non-finite gradients before the run stops
    workers: int = 0             # processes reading a task's files ahead of the model (image tasks)
    keep_best: bool = False      # keep the weights of the best validation (needs validate_every)
    ema: float = 0.0             # decay of a moving average of the weights, saved instead of them (0 = none)

    def __post_init__(self):
        if self.ema and not 0 < self.ema < 1:  # checked before anything loads
            raise BadInputError("--ema", f"the decay must be between 0 and 1, such as 0.999 (got {self.ema})")


# What may change when a run resumes: where and how often it writes, not what it computes (steps,
# batch, lr, warm-up and seed shape the schedule and the data order).
RESUMABLE_CHANGES = frozenset({"device", "checkpoint_every", "validate_every", "keep_checkpoints", "max_bad_steps",
                               "workers"})


class Task:
    """What a method contributes to training. Override the methods below."""

    model: torch.nn.Module
    # True when some trainable parameters get no gradient in a step (DDP must then look for them).
    unused_parameters: bool = False

    def num_examples(self) -> int:
        raise NotImplementedError

    def batch(self, indices: torch.Tensor, generator: torch.Generator) -> dict:
        """The batch of these example indices (on CPU); `generator` seeds any sampling."""
        raise NotImplementedError

    def batches(self, steps: range, batch_size: int, seed: int, workers: int = 0):
        """(indices, batch) for each step in order. A task that reads files overrides this to read
        ahead in `workers` processes; what a step gets must stay a function of (seed, step)."""
        n = self.num_examples()
        for step in steps:
            indices = step_indices(step, n, batch_size, seed)
            yield indices, self.batch(indices, step_generator(seed, step))

    def loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        """The mean loss over the batch's loss units, and values to log."""
        raise NotImplementedError

    def loss_units(self, batch: dict) -> float:
        """How many things the loss averages over (rows by default; a token-level loss counts tokens)."""
        return float(next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0])

    def trainable_parameters(self, model: torch.nn.Module):
        return [p for p in model.parameters() if p.requires_grad]

    def after_step(self, model: torch.nn.Module) -> None:
        """Hook for constraints applied after each optimiser step (e.g. clamping CLIP's logit scale)."""

    def calibrate(self, model: torch.nn.Module) -> dict:
        """Hook for what is chosen on the val split once training ends, kept on the model for
        save_metrics to write (e.g. a decoder's edit margin); returns what metrics.json records."""
        return {}

    def validate(self, model: torch.nn.Module) -> dict:
        return {}

    def selection_score(self, metrics: dict) -> float | None:
        """The number keep_best maximises, from what `validate` returned (None: none to choose by)."""
        return None

    def describe(self, model: torch.nn.Module) -> dict:
        """What the trained model records of itself in metrics.json and the report (not measured)."""
        return {}

    def save(self, model: torch.nn.Module, out_dir: Path, metrics: dict) -> None:
        """Save the trained model (and `metrics`, the training's own, to OUT/metrics.json)."""
        raise NotImplementedError

    def save_metrics(self, model: torch.nn.Module, out_dir: Path, metrics: dict) -> None:
        """Record the final metrics (validation included) beside the model `save` wrote."""
        write_json(Path(out_dir) / "metrics.json", metrics)


@dataclass
class TrainResult:
    steps: int
    seconds: float
    final_loss: float
    metrics: dict


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class _TaskLoss(torch.nn.Module):
    """The task's loss as a module's forward, so DDP (which hooks forward) synchronises gradients."""

    def __init__(self, task: Task):
        super().__init__()
        self.task = task
        self.model = task.model

    def forward(self, batch: dict):
        return self.task.loss(self.model, batch)


def process_rows(batch: dict, rows: int, rank: int, size: int) -> dict:
    """This process's rows (rank, rank+size, ...) of a global batch; other entries are shared."""
    if size == 1:
        return batch
    return {k: v[rank::size] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == rows else v
            for k, v in batch.items()}


def step_seed(seed: int, step: int, rank: int) -> int:
    """The global RNG's seed for one step of one process."""
    return (seed * 1_000_003 + step) * 1_009 + rank + 1


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of a step's sampling (which caption, how much noise): the same on every process."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def step_indices(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[i * batch_size:(i + 1) * batch_size]


def decays(name: str, parameter: torch.Tensor) -> bool:
    """open_clip's rule for weight decay: none on biases, norms and gains, 1-d embeddings (CLIP's
    class embedding) or the logit scale; matrices and convolutions only."""
    exempt = (parameter.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name)
    return not exempt


def parameter_groups(model: torch.nn.Module, trainable, weight_decay: float) -> list[dict]:
    """The optimiser's groups for these trainable parameters of `model`: decayed and not decayed."""
    wanted = {id(p) for p in trainable}
    named = [(n, p) for n, p in model.named_parameters() if id(p) in wanted]
    groups = [{"params": [p for n, p in named if decays(n, p)], "weight_decay": weight_decay},
              {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class WeightAverage:
    """An exponential moving average of a model's trainable weights (see the module's docstring): float32
    copies beside the weights, updated after each optimiser step, swapped in to be read."""

    def __init__(self, model: torch.nn.Module, trainable, decay: float):
        wanted = {id(p) for p in trainable}
        self.weights = {name: p for name, p in model.named_parameters() if id(p) in wanted}
        self.average = {name: p.detach().float().clone() for name, p in self.weights.items()}
        self.decay, self.updates = decay, 0

    def follow_weights(self) -> None:
        """Put each average where its weights are (after accelerate moved the model to its device)."""
        self.average = {name: a.to(self.weights[name].device) for name, a in self.average.items()}

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        rate = 1 - min(self.decay, (1 + self.updates) / (10 + self.updates))
        # one fused call over every tensor (a kernel launch per tensor would add up on a GPU)
        torch._foreach_lerp_(list(self.average.values()), [p.detach().float() for p in self.weights.values()], rate)

    @contextmanager
    def swapped_in(self):
        """The average in the model's weights for the block (to validate or save it), the weights back after."""
        held = {name: p.detach().clone() for name, p in self.weights.items()}
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.weights.items():
                    p.copy_(held[name])

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for name, p in self.weights.items():
            p.copy_(self.average[name].to(p.dtype))

    def state(self) -> dict:
        return {**self.average, "updates": torch.tensor(self.updates)}

    def restore(self, tensors: dict) -> None:
        if tensors.keys() - {"updates"} != self.average.keys():
            raise TrainingError("the checkpoint's weight average does not fit this model; start without --resume")
        self.updates = int(tensors["updates"])
        for name in self.average:
            self.average[name].copy_(tensors[name])


def _weight_average(task: Task, config: TrainConfig) -> WeightAverage | None:
    if not config.ema:
        return None
    return WeightAverage(task.model, task.trainable_parameters(task.model), config.ema)


# --- checkpoints --------------------------------------------------------------------------------

def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Split an optimiser state into safetensors-able tensors and JSON-able rest (no pickle)."""
    sd = optimizer.state_dict()
    tensors = {f"{idx}.{name}": value for idx, st in sd["state"].items() for name, value in st.items()
               if isinstance(value, torch.Tensor)}
    scalars = {f"{idx}.{name}": value for idx, st in sd["state"].items() for name, value in st.items()
               if not isinstance(value, torch.Tensor)}
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer, tensors: dict, rest: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(rest["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


def save_checkpoint(ckpt_root: Path, step: int, model, optimizer, config: TrainConfig, keep: int,
                    scaler=None, average: WeightAverage | None = None) -> Path:
    name = f"step-{step:08d}"
    tmp = ckpt_root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_module(tmp / "model.safetensors", model)
    opt_tensors, opt_rest = _optimizer_tensors(optimizer)
    save_tensors(tmp / "optimizer.safetensors", opt_tensors)
    if average is not None:
        save_tensors(tmp / "ema.safetensors", average.state())
    write_json(tmp / "state.json", {"step": step, "optimizer": opt_rest, "config": asdict(config),
                                    "grad_scaler": scaler.state_dict() if scaler is not None else None})
    final = ckpt_root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_json(ckpt_root / "latest.json", {"step": step, "dir": name})
    old = sorted(p for p in ckpt_root.glob("step-*") if p.name != name)
    for p in old[:max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def load_checkpoint(ckpt_root: Path, model, optimizer, config: TrainConfig | None = None, scaler=None,
                    average: WeightAverage | None = None) -> int:
    """Restore the latest complete checkpoint; return its step (0 when there is none). With `config`,
    refuse to resume under settings that would change what the run computes."""
    latest = ckpt_root / "latest.json"
    if not latest.is_file():
        return 0
    pointer = read_json(latest)
    directory = ckpt_root / pointer["dir"]
    state = read_json(directory / "state.json")
    if config is not None:
        saved, now = state.get("config", {}), asdict(config)
        changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in sorted(now)
                   if k in saved and saved[k] != now[k] and k not in RESUMABLE_CHANGES]
        if changed:
            raise TrainingError(f"cannot resume from {directory}: these settings differ from the checkpoint's and would "
                                f"change the run ({', '.join(changed)}); give the same values, or start without --resume")
    try:
        load_module(model, directory / "model.safetensors")
    except BadInputError as e:
        raise TrainingError(f"checkpoint {directory} does not fit this model: {e.reason}") from None
    opt_tensors, _ = load_tensors(directory / "optimizer.safetensors")
    opt_tensors.pop("torch_rng", None)  # checkpoints before per-step seeding carried it
    try:
        _restore_optimizer(optimizer, opt_tensors, state["optimizer"])
    except ValueError as e:  # e.g. a checkpoint from before weight decay was split into two groups
        raise TrainingError(f"checkpoint {directory} does not fit this optimiser ({e}); start without --resume") from None
    if scaler is not None and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    if average is not None:
        if not (directory / "ema.safetensors").is_file():
            raise TrainingError(f"checkpoint {directory} has no weight average (it was trained without --ema); "
                                "give the same values, or start without --resume")
        average.restore(load_tensors(directory / "ema.safetensors")[0])
    return int(state["step"])


BEST_DIR = "best"


def best_so_far(ckpt_root: Path) -> dict | None:
    """{"step", "score"} of the best validated weights kept under ckpt_root, or None."""
    record = ckpt_root / BEST_DIR / "best.json"
    return read_json(record) if record.is_file() else None


def keep_if_best(ckpt_root: Path, step: int, model, score: float | None) -> bool:
    """Write the model's weights as the best so far when `score` beats the kept one (the directory is
    replaced whole, io.staged_dir: a crash leaves the old best or the new one)."""
    best = best_so_far(ckpt_root)
    if score is None or (best is not None and score <= best["score"]):
        return False
    with staged_dir(ckpt_root / BEST_DIR, keep_others=False) as staging:
        save_module(staging / "model.safetensors", model)
        write_json(staging / "best.json", {"step": step, "score": score})
    return True


def _check_keep_best(task: Task, config: TrainConfig) -> None:
    if not config.keep_best:
        return
    if not config.validate_every:
        raise BadInputError("--keep-best", "needs --validate-every N: the weights it keeps are those of a validation")
    if type(task).selection_score is Task.selection_score:
        raise BadInputError("--keep-best", "this model has no validation score to choose by")


# --- the loop -----------------------------------------------------------------------------------

def _synchronise_batch_norm(model: torch.nn.Module, accelerator) -> None:
    """BatchNorm normalises over the batch: across processes that is exact only with SyncBatchNorm,
    which torch runs on GPUs alone. On CPU each process normalises over its own rows; say so."""
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    if accelerator.device.type == "cuda":
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif accelerator.is_main_process:
        print("note: this model has BatchNorm layers, which CPU processes cannot synchronise: each normalises "
              "over its own rows, so the weights differ slightly from a one-process run", file=sys.stderr, flush=True)


def _make_accelerator(task: Task, config: TrainConfig, grad_scaler):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    from unembed.embedders import resolve_device

    resolve_device(config.device)  # a device that is not there: one error naming it, not a run elsewhere
    ddp = DistributedDataParallelKwargs(find_unused_parameters=task.unused_parameters)
    # accelerate keeps one precision per process; each run sets its own (several run in one process:
    # compare, tests). The process group (its PartialState) is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=use_cpu(config.device), mixed_precision=config.mixed_precision,
                              kwargs_handlers=[ddp])
    if grad_scaler is not None:  # the fp16 path accelerate takes on a GPU, on any device (tests drive it on CPU)
        accelerator.scaler, accelerator.native_amp = grad_scaler, True
    elif config.mixed_precision == "fp16" and accelerator.scaler is None and accelerator.is_main_process:
        # accelerate has no fp16 on the CPU and silently trains in fp32: say so (bf16 runs on CPUs).
        print(f"note: --mixed-precision fp16 needs a GPU; this run is on the {accelerator.device.type} and trains in "
              "fp32 (bf16 runs on CPUs too)", file=sys.stderr, flush=True)
    return accelerator


def _stop_if_non_finite(loss: torch.Tensor, step: int, accelerator, ckpt_root: Path) -> None:
    """Every process stops at the same step when any process's loss is non-finite: one flag, summed
    over processes, so none is left waiting in the next collective."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, "sum")
    if bad.item():
        value = loss.item() if not torch.isfinite(loss) else "non-finite on another process"
        raise TrainingError(f"loss became {value} at step {step}; stopped. The last good checkpoint "
                            f"is in {ckpt_root} (continue from it with --resume and a lower --lr)")


def _validate(task: Task, model, step: str = "validate", what: str = "validation") -> dict:
    """The task's validation (or another of its steps on the val split: `step`, a method's name), or
    why it could not run: a missing tool (Java) or memory never costs the trained model, which is saved
    before."""
    try:
        return getattr(task, step)(model)
    except (UnembedError, MemoryError, torch.cuda.OutOfMemoryError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"warning: {what} not run: {reason}", file=sys.stderr, flush=True)
        return {what: f"not run: {reason}"}


def _keep_if_best_validated(task: Task, ckpt_root: Path, step: int, record: dict, unscored: bool) -> bool:
    """keep_best after the validation of `step` (in its log `record`): its weights kept when they score
    best so far. A validation with no score (no val split) is said once; returns whether one was."""
    score = task.selection_score(record)
    if score is None and not unscored:
        print(f"note: --keep-best: the validation at step {step} gave no score to choose by (is there a val "
              "split?); the last step's weights will be kept", file=sys.stderr, flush=True)
    if keep_if_best(ckpt_root, step, task.model, score):
        record["kept_as_best"] = True
    return unscored or score is None


def _restore_best(task: Task, ckpt_root: Path, out_dir: Path, metrics: dict, summary: dict,
                  total: int) -> tuple[dict, dict]:
    """keep_best at the end: the last step's validation against the best kept one. When the best is
    earlier, its weights replace the model, which is saved again and validated again."""
    best, last = best_so_far(ckpt_root), task.selection_score(metrics)
    if best is None or last is None or last >= best["score"]:
        return metrics, {**summary, "kept_step": total}
    load_module(task.model, ckpt_root / BEST_DIR / "model.safetensors")
    summary = {**summary, "kept_step": best["step"], "last_step_score": last}
    task.save(task.model, out_dir, summary)
    return {**_validate(task, task.model, "describe", "description"), **_validate(task, task.model)}, summary


def fit(task: Task, config: TrainConfig, out_dir, resume: bool = False, progress: bool = True,
        grad_scaler=None) -> TrainResult:
    """Train `task` under `config` into out_dir. `grad_scaler` replaces accelerate's fp16 grad scaler
    (which it makes on GPUs only), e.g. `torch.amp.GradScaler("cpu")` to run the fp16 path on a CPU."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_root = out_dir / "checkpoints"
    torch.manual_seed(config.seed)
    accelerator = _make_accelerator(task, config, grad_scaler)
    rank, world = accelerator.process_index, accelerator.num_processes

    _check_keep_best(task, config)
    average = _weight_average(task, config)
    n = task.num_examples()
    if n == 0:
        raise TrainingError("no training examples")
    batch_size = min(config.batch_size, n)
    total = config.max_steps or config.epochs * max(1, n // batch_size)
    optimizer = torch.optim.AdamW(parameter_groups(task.model, task.trainable_parameters(task.model),
                                                   config.weight_decay), lr=config.lr)
    if world > 1:
        _synchronise_batch_norm(task.model, accelerator)
    scaler = accelerator.scaler  # fp16 only
    start = load_checkpoint(ckpt_root, task.model, optimizer, config, scaler, average) if resume else 0
    if not resume and ckpt_root.exists() and accelerator.is_main_process:
        shutil.rmtree(ckpt_root)
    accelerator.wait_for_everyone()
    model, optimizer = accelerator.prepare(_TaskLoss(task), optimizer)
    if average is not None:
        average.follow_weights()
    log_path = out_dir / "train_log.jsonl" if accelerator.is_main_process else os.devnull

    bar = tqdm(total=total, initial=start, disable=not progress or not accelerator.is_main_process,
               desc="train", unit="step", dynamic_ncols=True)
    t0, loss_value, seen, bad_in_a_row, skipped, overflows = time.time(), float("nan"), 0, 0, 0, 0
    unscored = False  # keep_best's note, said once
    steps = range(start, total)
    with open(log_path, "a", encoding="utf-8") as log:
        for step, (indices, batch) in zip(steps, task.batches(steps, batch_size, config.seed, config.workers)):
            torch.manual_seed(step_seed(config.seed, step, rank))  # dropout; CUDA's generators too
            mine = process_rows(batch, len(indices), rank, world)
            share = world * task.loss_units(mine) / task.loss_units(batch)
            batch = {k: v.to(accelerator.device) if isinstance(v, torch.Tensor) else v for k, v in mine.items()}
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, config)
            model.train()
            with accelerator.autocast():
                loss, logs = model(batch)
                loss = loss * share
            _stop_if_non_finite(loss, step, accelerator, ckpt_root)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            # The norm over all gradients (clipping them when asked; unscaled first under fp16): one
            # non-finite gradient makes it non-finite.
            norm = accelerator.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
            finite = bool(torch.isfinite(torch.as_tensor(norm)))
            if finite or scaler is not None:
                optimizer.step()  # a grad scaler skips an overflowed step itself and lowers its scale
            # An overflow is the scaler's job while its scale is above 1; below, the gradients are
            # non-finite unscaled too, which is a bad step.
            if scaler is not None and accelerator.optimizer_step_was_skipped and scaler.get_scale() >= 1:
                overflows += 1
                log.write(json.dumps({"step": step + 1, "skipped": "fp16 overflow",
                                      "grad_scale": scaler.get_scale()}) + "\n")
                continue
            if not finite:
                optimizer.zero_grad(set_to_none=True)
                bad_in_a_row, skipped = bad_in_a_row + 1, skipped + 1
                log.write(json.dumps({"step": step + 1, "skipped": "non-finite gradients"}) + "\n")
                if bad_in_a_row >= config.max_bad_steps:
                    raise TrainingError(f"gradients were non-finite for {bad_in_a_row} steps in a row (to step {step}); "
                                        f"stopped. The last good checkpoint is in {ckpt_root}")
                continue
            bad_in_a_row = 0
            task.after_step(task.model)
            if average is not None:
                average.update()
            loss_value = accelerator.reduce(loss.detach(), "mean").item() if world > 1 else loss.item()
            seen += len(indices)
            done = step + 1
            record = {"step": done, "loss": round(loss_value, 5), "lr": group["lr"], **logs}
            if (config.validate_every and done % config.validate_every == 0 and done < total
                    and accelerator.is_main_process):
                with average.swapped_in() if average is not None else nullcontext():
                    record.update(_validate(task, task.model))
                    if config.keep_best:
                        unscored = _keep_if_best_validated(task, ckpt_root, done, record, unscored)
            log.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{loss_value:.3f}", ex_s=f"{seen / (time.time() - t0):.0f}")
            bar.update(1)
            if accelerator.is_main_process and (done % config.checkpoint_every == 0 or done == total):
                log.flush()
                save_checkpoint(ckpt_root, done, task.model, optimizer, config, config.keep_checkpoints, scaler,
                                average)
    bar.close()
    seconds = time.time() - t0
    metrics = {}
    if average is not None:
        average.copy_to_model()  # training is over: the average is the model
    if accelerator.is_main_process:
        summary = {"train_steps": total, "train_seconds": round(seconds, 1), "final_loss": loss_value,
                   "skipped_steps": skipped, "fp16_overflow_steps": overflows,
                   **({"ema_decay": config.ema} if average is not None else {})}
        task.save(task.model, out_dir, summary)  # first: the model never waits on its validation
        metrics = {**_validate(task, task.model, "describe", "description"), **_validate(task, task.model)}
        if config.keep_best:
            metrics, summary = _restore_best(task, ckpt_root, out_dir, metrics, summary, total)
        if "validation" not in metrics:  # what it could not run, the calibration cannot either
            metrics.update(_validate(task, task.model, "calibrate", "calibration"))
        task.save_metrics(task.model, out_dir, {**metrics, **summary})
    accelerator.wait_for_everyone()
    return TrainResult(total, seconds, loss_value, metrics)
