"""`megatron-dyt train`: the training loop around a DeepSpeed engine.

Data position: a data cursor, saved in every checkpoint, says which global batch the next step
takes (the order of samples within batches: `training/batches.py`): normally the step number,
one further for every batch left out after a NaN/Inf loss, so resumed and rescaled runs see the
same data.
"""

from __future__ import annotations

import json
import math
import resource
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_dyt import __version__, checkpoint, parallel
from megatron_dyt.checkpoint.format import GROUPING_KEY
from megatron_dyt.config import Config, load_config
from megatron_dyt.errors import MegatronDyTError
from megatron_dyt.fileio import atomic_write
from megatron_dyt.layout import batch_layout, data_parallel_size, run_layout
from megatron_dyt.model.flops import flops_per_token
from megatron_dyt.model.groups import GROUPING
from megatron_dyt.training.batches import StepBatches
from megatron_dyt.training.engine import build_model, deepspeed_config, initialize
from megatron_dyt.training.init_from import load_init_weights
from megatron_dyt.training.metrics import (
    MetricsWriter,
    NormStats,
    StepTimer,
    log_line,
    peak_tflops,
)
from megatron_dyt.training.schedule import lr_factor


class TrainingError(MegatronDyTError, RuntimeError):
    """Training cannot go on (diverged loss, refused run folder); the message says why."""

    exit_code = 1


@dataclass
class TrainResult:
    run_dir: Path
    start_step: int
    step: int
    losses: dict[int, float] = field(default_factory=dict)
    valid_losses: dict[int, float] = field(default_factory=dict)
    stopped_by_signal: bool = False
    checkpoint: Path | None = None


# ---- run folder --------------------------------------------------------------------------------


def write_status(run_dir: Path, state: str, step: int, total_steps: int, **extra: Any) -> None:
    """`status.json`: how this invocation ended ("finished", "stopped" early with a checkpoint
    to resume from, or "diverged"), for SLURM requeue logic and sweep bookkeeping."""
    record = {
        "state": state,
        "step": step,
        "train_steps": total_steps,
        "time": time.time(),
        "version": __version__,
    }
    record.update({k: v for k, v in extra.items() if v is not None})
    atomic_write(run_dir / "status.json", json.dumps(record) + "\n")


# Keys that may change between a run and its resumption: how to resume, and (with
# resume.reshard=true) the parallel layout, which resharding converts the checkpoint to.
_RESUME_KEYS = ("resume.",)
_LAYOUT_KEYS = (
    "parallel.tensor:",
    "parallel.pipeline:",
    "parallel.zero_stage:",
    "parallel.sequence_parallel:",
)


def prepare_run_dir(cfg: Config, run_dir: Path, allow_config_change: bool) -> None:
    """Refuse to resume a folder trained with a different config, unless asked to."""
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainingError(f"run folder '{run_dir}' is a file; give --run-dir a folder")
    saved = run_dir / "config.yaml"
    if saved.is_file():
        old = load_config(saved, saved=True)
        ignored = _RESUME_KEYS + (_LAYOUT_KEYS if cfg.resume.reshard else ())
        diff = [d for d in _config_diff(old.to_dict(), cfg.to_dict()) if not d.startswith(ignored)]
        if diff and not allow_config_change:
            hint = ""
            if all(d.startswith(_LAYOUT_KEYS) for d in diff):
                hint = "; or set resume.reshard=true to resume it at the new parallel layout"
            raise TrainingError(
                f"run folder '{run_dir}' holds a run with a different config"
                f" ({'; '.join(diff[:8])}); use another --run-dir, or pass"
                f" --allow-config-change to continue this run with the new config{hint}"
            )


def _check_resume_layout(cfg: Config, folder: Path, world_size: int, regroup: bool = False) -> bool:
    """Whether checkpoint `folder` must be resharded to resume at this run's layout (`regroup`:
    its optimizer groups differ from this run's, `_optimizer_groups_changed`).

    Without resume.reshard=true a different layout is an error that says what to do.
    """
    current = run_layout(cfg, world_size)
    if checkpoint.is_universal(folder):
        saved = None
    else:
        saved = checkpoint.saved_layout(folder)
        if current.loads_natively(saved) and not regroup:
            return False
        if regroup and not cfg.resume.reshard:
            raise TrainingError(
                f"checkpoint '{folder}' was saved before the optimizer kept one-element tensors"
                " (DyT's α, the embedding scale) in parameter groups of their own, so its"
                " optimizer state does not load as it is. Set resume.reshard=true to convert it"
                " while resuming (weights, Adam moments and position are kept), or convert it"
                " first with `megatron-dyt convert reshard`"
            )
        if not cfg.resume.reshard:
            raise TrainingError(
                f"checkpoint '{folder}' was saved at {saved.describe()}; this run is"
                f" {current.describe()}. Set resume.reshard=true to convert its weights and"
                " optimizer state to this layout while resuming, or convert it first with"
                " `megatron-dyt convert reshard`"
            )
    for side, lay in (("this run", current), ("the checkpoint", saved)):
        if lay is not None and (lay.zero_stage == 3 or lay.optimizer == "fp16"):
            raise TrainingError(
                f"cannot reshard '{folder}': {side} is {lay.describe()}"
                f"{' with fp16' if lay.optimizer == 'fp16' else ''}; resharding supports ZeRO"
                " stages 0-2 in fp32 or bf16"
            )
    return True


def _optimizer_groups_changed(cfg: Config, folder: Path, model: torch.nn.Module) -> bool:
    """Whether a checkpoint's optimizer groups differ from the ones this rank's `model` trains
    in: a checkpoint of an older grouping, and tensors that are now kept apart."""
    from megatron_dyt.model import canonical_parameters
    from megatron_dyt.model.groups import group_key, shape_of

    if checkpoint.is_universal(folder):
        return False  # no optimizer groups in it: loaded tensor by tensor
    if checkpoint.read_complete(folder).get(checkpoint.WEIGHTS_ONLY, False):
        return False  # no optimizer state to match
    if checkpoint.saved_grouping(folder) == GROUPING:
        return False
    return any(
        group_key(name, shape_of(p), cfg)[2]
        for name, p in canonical_parameters(model)
        if p.requires_grad
    )


def _config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


# ---- the loop ----------------------------------------------------------------------------------


class _StopFlag:
    """SIGTERM / SIGUSR1 (SLURM pre-emption) ask for a checkpoint and a clean exit."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def _dp_mean(value: torch.Tensor) -> float:
    value = value.detach().float().reshape(1).clone()
    group = ps.get_data_parallel_group()
    dist.all_reduce(value, group=group)
    return value.item() / dist.get_world_size(group)


def _train_step(engine, batches: list, pipeline: bool) -> torch.Tensor:
    """One optimizer step; the loss as a device tensor (no host sync): with pipeline
    parallelism DeepSpeed's, already averaged over DP and sent to every rank; else this rank's
    mean over its micro-batches."""
    if pipeline:
        return engine.train_batch(data_iter=iter(batches)).detach()
    losses = []
    for tokens, labels in batches:
        loss = engine(tokens, labels)
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    return torch.stack(losses).mean()


def _agree(
    loss: torch.Tensor, stopping: bool, save_due: bool, pipeline: bool
) -> tuple[float, bool, bool]:
    """(the step's loss averaged over DP, whether any rank got a stop signal, whether any rank
    says a save is due): one all-reduce and the step's only host sync outside log steps. Each DP
    replica's loss is counted once (TP peers hold copies; with PP every rank holds DeepSpeed's
    average)."""
    if pipeline:
        counted, replicas = dist.get_rank() == 0, 1
    else:
        counted, replicas = (
            ps.get_tensor_model_parallel_rank() == 0,
            ps.get_data_parallel_world_size(),
        )
    mine = loss.float() if counted else torch.zeros_like(loss, dtype=torch.float32)
    values = torch.stack([mine, mine.new_tensor(float(stopping)), mine.new_tensor(float(save_due))])
    dist.all_reduce(values)
    total, signals, saves = values.tolist()
    return total / replicas, signals > 0, saves > 0


@torch.no_grad()
def _evaluate(engine, valid: StepBatches, n_batches: int, pipeline: bool) -> float:
    total = 0.0
    for b in range(n_batches):
        batches = valid.for_step(b)
        if pipeline:
            total += engine.eval_batch(iter(batches), num_micro_batches=len(batches)).item()
        else:
            engine.eval()
            loss = torch.stack([engine(t, lab) for t, lab in batches]).mean()
            engine.train()
            total += _dp_mean(loss)
    return total / n_batches


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


def _peak_memory() -> tuple[str, float]:
    """(what, GiB): the GPU's peak allocation, or on CPU the process's peak resident memory."""
    if torch.cuda.is_available():
        return "peak_mem", torch.cuda.max_memory_allocated() / 2**30
    return "peak_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _scheduled_lr(engine) -> float:
    """The lr of the parameter groups without a multiplier: with `train.dyt_lr_multiplier` the
    DyT scalars' group runs at another lr, and it may sort first."""
    for group in engine.optimizer.param_groups:
        if group.get("lr_mult", 1.0) == 1.0:
            return group["lr"]
    return engine.get_lr()[0]


@dataclass
class Position:
    """Where a run is: optimizer steps done, the data batch the next step takes (`cursor`), and
    the batches left out after a non-finite loss (saved in every checkpoint)."""

    step: int = 0
    cursor: int = 0
    skipped: list[int] = field(default_factory=list)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Position:
        """From a checkpoint's client state (older ones have no cursor: it was the step)."""
        step = int(state["step"])
        return cls(
            step, int(state.get("data_cursor", step)), list(state.get("skipped_batches", []))
        )

    def next_batch(self) -> int:
        """The data batch of the next step: the cursor, moved past any left-out batch."""
        while self.cursor in self.skipped:
            self.cursor += 1
        return self.cursor


class NonFiniteGuard:
    """What a NaN/Inf loss does: rewind to the last good checkpoint and leave that step's data
    batch out, at most `limit` times in a run (`train.skip_nonfinite_steps`); else stop."""

    def __init__(self, limit: int):
        self.limit = limit

    def rewind(self, position: Position, last_good: str | None) -> bool:
        """True (and the batch recorded as left out) when the run may rewind to `last_good`."""
        if last_good is None or len(position.skipped) >= self.limit:
            return False
        position.skipped.append(position.cursor)
        return True


class Trainer:
    """One invocation of a run: set up, resume, then step, log and save until the end.

    Every rank of the job builds one. `fit` is the loop; the steps it takes are methods, so
    each reads on its own: `resume`, `train_step`, `rewind` (non-finite loss), `log`, `save`.
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        *,
        allow_config_change: bool = False,
        progress: bool = True,
    ):
        from megatron_dyt.data import build_datasets, resolve_data
        from megatron_dyt.model import init_weights

        parallel.setup(cfg.parallel)
        parallel.init_deepspeed_comm()
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.is_rank0 = dist.get_rank() == 0
        self.world = dist.get_world_size()
        prepare_run_dir(cfg, self.run_dir, allow_config_change)

        self.layout = batch_layout(cfg, data_parallel_size(cfg.parallel, self.world))
        self.ckpt_root = self.run_dir / "checkpoints"
        notices: list[str] = []
        self.resume_tag = checkpoint.find_latest(self.ckpt_root, notices)
        if self.is_rank0 and notices:
            print(f"note: {notices[0]}", file=sys.stderr, flush=True)
        self.resharded = self.resume_tag is not None and _check_resume_layout(
            cfg, self.ckpt_root / self.resume_tag, self.world
        )
        ds_config = deepspeed_config(cfg, self.layout)
        self.total_steps = cfg.train.train_steps

        self.tokenizer, _, _ = resolve_data(cfg)  # also checks it fits model.vocab_size
        self.zero_shot_tasks = _zero_shot_tasks(cfg)
        g = self.layout.global_batch
        self.eval_batches = math.ceil(cfg.train.eval_samples / g) if cfg.train.eval_interval else 0
        train_ds, valid_ds = build_datasets(
            cfg,
            self.tokenizer,
            # every skipped non-finite step moves the data cursor one batch further
            (self.total_steps + cfg.train.skip_nonfinite_steps) * g,
            max(1, self.eval_batches) * g,
        )
        self.ds_config = ds_config

        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg, ds_config)
        self.init_source = None
        if self.resume_tag is None and cfg.train.init_from:
            self.init_source = load_init_weights(self.model, cfg)
        else:
            init_weights(self.model, cfg.model, cfg.train.seed)
        if self.resume_tag is not None and not self.resharded:
            folder = self.ckpt_root / self.resume_tag
            changed = _optimizer_groups_changed(cfg, folder, self.model)
            flag = torch.tensor([float(changed)], device=_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank takes the same path
            if flag.item():
                self.resharded = _check_resume_layout(cfg, folder, self.world, regroup=True)
        parameters = _count_parameters(self.model)
        self.engine = initialize(
            self.model,
            cfg,
            ds_config,
            lambda s: lr_factor(s, cfg.warmup_steps, self.total_steps, cfg.train.min_lr_ratio),
        )
        self.pipeline = cfg.parallel.pipeline > 1
        device, dp_rank = _device(), ps.get_data_parallel_rank()
        self.batches = StepBatches(train_ds, self.layout, dp_rank, device, read_ahead=True)
        self.valid = (
            StepBatches(valid_ds, self.layout, dp_rank, device)
            if valid_ds is not None and self.eval_batches
            else None
        )
        self.guard = NonFiniteGuard(cfg.train.skip_nonfinite_steps)
        self.position = Position()
        self.flops_per_token = flops_per_token(cfg, parameters)
        self.peak = peak_tflops(cfg)
        self.tokens_per_step = g * cfg.model.seq_length
        self.progress = progress
        self.stats = self.writer = self.stop = self.bar = self.timer = None
        self.lines = False
        self.last_save = time.monotonic()

    # ---- the steps of the loop ---------------------------------------------------------------

    def _load(self, tag: str, reshard: bool) -> dict[str, Any]:
        """Load checkpoint `tag` into the engine; its client state (the data position)."""
        if not reshard:
            return checkpoint.load(self.engine, self.ckpt_root, tag)
        folder = self.ckpt_root / tag
        universal = checkpoint.universal_of(folder, progress=self.is_rank0 and self.progress)
        return checkpoint.load_universal(self.engine, universal, self.cfg, self.layout.global_batch)

    def _record_config(self) -> None:
        """The run folder's config.yaml and deepspeed_config.json, written once the inputs are
        valid and the checkpoint has loaded: a run that fails before keeps its folder as it
        was, so the config there still describes its checkpoints."""
        if self.is_rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # atomic: a run killed while writing must not leave a config its resume cannot read
            atomic_write(self.run_dir / "config.yaml", self.cfg.to_yaml())
            ds_json = json.dumps(self.ds_config, indent=2) + "\n"
            atomic_write(self.run_dir / "deepspeed_config.json", ds_json)
        dist.barrier()

    def resume(self) -> None:
        """Continue from the run folder's latest checkpoint, if it has one."""
        if self.resume_tag is None:
            if self.is_rank0 and self.init_source is not None:
                print(
                    f"starting from the weights of {self.init_source.describe()}"
                    " (train.init_from: fresh optimizer, lr schedule and data position)",
                    flush=True,
                )
            return
        folder = self.ckpt_root / self.resume_tag
        if self.is_rank0 and self.cfg.train.init_from:
            print(f"train.init_from ignored: resuming from {folder}", flush=True)
        state = self._load(self.resume_tag, self.resharded)
        self.position = Position.from_state(state)
        if self.is_rank0 and state.get("weights_only"):
            print(
                f"starting from the weights in {folder} (imported: fresh optimizer"
                " and learning-rate schedule)",
                flush=True,
            )
        elif self.is_rank0:
            how = " (resharded to this layout)" if self.resharded else ""
            print(f"resuming from {folder} (step {self.position.step}){how}", flush=True)

    def train_step(self, record_stats: bool) -> tuple[float, float, float, bool, bool]:
        """One optimizer step on the next data batch: (loss, lr it used, seconds, whether any
        rank got a stop signal, whether `train.save_interval_minutes` have passed since the last
        save by rank 0's clock); with `record_stats` the norms keep statistics of their first
        micro-batch (`NormStats`). One host sync (`_agree`)."""
        lr = _scheduled_lr(self.engine)  # the scheduler moves on after the step
        t0 = time.perf_counter()
        with self.stats.recording() if record_stats else nullcontext():
            batches = self.batches.for_step(self.position.next_batch())
            loss = _train_step(self.engine, batches, self.pipeline)
        minutes = self.cfg.train.save_interval_minutes
        save_due = bool(
            minutes and self.is_rank0 and time.monotonic() - self.last_save >= 60 * minutes
        )
        value, stop, save_due = _agree(loss, self.stop.signal is not None, save_due, self.pipeline)
        return value, lr, time.perf_counter() - t0, stop, save_due

    def rewind(self, loss: float, result: TrainResult) -> None:
        """A non-finite loss: go back to the last good checkpoint without this step's batch, or
        stop the run (status `diverged`) when no rewind is left."""
        good = checkpoint.find_latest(self.ckpt_root)
        skipped = self.position.skipped
        if not self.guard.rewind(self.position, good):
            where = (
                f"the last good checkpoint is '{self.ckpt_root / good}'"
                if good
                else "no checkpoint was saved yet"
            )
            if self.is_rank0:
                write_status(self.run_dir, "diverged", self.position.step, self.total_steps)
            raise TrainingError(
                f"loss is {loss} at step {self.position.step + 1}: training diverged and stopped;"
                f" {where}. Lower train.lr, raise warm-up or lower the DyT α₀"
                " (model.norm.alpha_*); train.skip_nonfinite_steps=N rewinds and skips up to N"
                " such batches"
            )
        loaded = Position.from_state(self._load(good, good == self.resume_tag and self.resharded))
        self.position = Position(loaded.step, loaded.cursor, skipped)
        result.losses = {k: v for k, v in result.losses.items() if k <= loaded.step}
        event = {"event": "nonfinite_loss_rewind", "loss": loss, "skipped_batch": skipped[-1]}
        self.writer.write(loaded.step, event)
        if self.is_rank0:
            print(
                f"\nloss is {loss} on data batch {skipped[-1]}: rewound to"
                f" {self.ckpt_root / good} and leaving that batch out"
                f" ({len(skipped)}/{self.guard.limit} skips used)",
                flush=True,
            )
        if self.bar is not None:
            self.bar.n = loaded.step

    def log(
        self,
        result: TrainResult,
        loss: float,
        lr: float,
        seconds: float,
        full: bool,
        stats: bool,
    ) -> None:
        """Metrics of the step just taken (`full`: a `train.log_interval` step; `stats`: with the
        norm statistics, a collective), the validation loss and zero-shot scores when due, the
        log line or the progress bar. Only a step that writes a record reads the GPU again (the
        grad norm, the statistics); a step that writes none adds no host sync."""
        cfg, step = self.cfg, self.position.step
        self.timer.add(seconds)
        last = step == self.total_steps
        validate = self.valid is not None and (step % cfg.train.eval_interval == 0 or last)
        zero_shot = bool(self.zero_shot_tasks) and (step % cfg.eval.every_n_steps == 0 or last)
        record: dict[str, Any] = {"loss": loss, "lr": lr}
        if full or stats or validate or zero_shot:
            tps = self.tokens_per_step / seconds
            tflops = self.flops_per_token * tps / self.world / 1e12
            record.update(
                grad_norm=_grad_norm(self.engine),
                tokens_per_s=tps,
                step_time_s=seconds,
                tflops_per_gpu=tflops,
                mfu=tflops / self.peak if self.peak else None,
                consumed_samples=self.position.cursor * self.layout.global_batch,
            )
            if stats:
                record.update({f"norm/{k}": v for k, v in self.stats.gather().items()})
            if validate:
                record["valid_loss"] = _evaluate(
                    self.engine, self.valid, self.eval_batches, self.pipeline
                )
                result.valid_losses[step] = record["valid_loss"]
            if zero_shot:
                tasks = self.zero_shot_tasks
                record.update(_zero_shot(self.engine.module, cfg, self.tokenizer, tasks))
            self.writer.write(step, record)
        if full and self.lines:
            mean, left = self.timer.take()
            tps = self.tokens_per_step / mean
            tflops = self.flops_per_token * tps / self.world / 1e12
            print(
                log_line(
                    step,
                    self.total_steps,
                    loss=loss,
                    lr=lr,
                    grad_norm=record["grad_norm"],
                    tokens_per_s=tps,
                    tflops_per_gpu=tflops,
                    mfu=tflops / self.peak if self.peak else None,
                    memory=_peak_memory(),
                    seconds_left=left,
                ),
                flush=True,
            )
        if self.bar is not None:
            postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}"}
            if record.get("grad_norm") is not None:
                postfix["gnorm"] = f"{record['grad_norm']:.3f}"
            if "tokens_per_s" in record:
                postfix["tok_s"] = f"{record['tokens_per_s']:,.0f}"
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def save(self) -> Path:
        """A checkpoint of this step (collective), with the data position."""
        pos, g = self.position, self.layout.global_batch
        client = {
            "step": pos.step,
            "data_cursor": pos.cursor,
            "consumed_samples": pos.cursor * g,
            "skipped_batches": pos.skipped,
            "layout": asdict(run_layout(self.cfg, self.world)),
            GROUPING_KEY: GROUPING,
        }
        t0 = time.perf_counter()
        self.last_save = time.monotonic()  # the clock of save_interval_minutes starts again
        folder = checkpoint.save(
            self.engine,
            self.ckpt_root,
            pos.step,
            client,
            self.cfg,
            self.tokenizer,
            self.cfg.train.keep_checkpoints,
        )
        if self.is_rank0:  # every rank's files are written: the save ends with a barrier
            self._report_save(folder, time.perf_counter() - t0)
        return folder

    def _report_save(self, folder: Path, seconds: float) -> None:
        """How long the GPUs waited for the checkpoint and at what rate it was written: to
        metrics.jsonl, and as a plain line where no terminal reads."""
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        event = {
            "event": "checkpoint",
            "path": str(folder),
            "seconds": seconds,
            "gigabytes": size / 1e9,
            "gigabytes_per_s": size / 1e9 / max(seconds, 1e-9),
        }
        self.writer.write(self.position.step, event)
        if self.lines:
            print(
                f"checkpoint step {self.position.step}: {size / 1e9:.2f} GB in {seconds:.1f} s"
                f" ({event['gigabytes_per_s']:.2f} GB/s) {folder}",
                flush=True,
            )

    # ---- the loop ----------------------------------------------------------------------------

    def fit(self, stop_after: int | None = None) -> TrainResult:
        """Train to `train.train_steps`, or until a stop signal (or `stop_after` steps of this
        invocation, for tests); the last step is always saved."""
        cfg, total = self.cfg, self.total_steps
        self.resume()
        self._record_config()
        result = TrainResult(self.run_dir, start_step=self.position.step, step=self.position.step)
        self.stats = NormStats(self.model, cfg, _device())
        self.writer = MetricsWriter(
            self.run_dir, cfg, enabled=self.is_rank0, start_step=self.position.step
        )
        self.stop = _StopFlag()
        # a progress bar on a terminal; plain lines where no terminal reads (SLURM logs)
        on_terminal = self.progress and sys.stderr.isatty()
        self.bar = _progress_bar(self.is_rank0 and on_terminal, self.position.step, total)
        self.lines = self.is_rank0 and not on_terminal
        self.timer = StepTimer(total - self.position.step)
        self.last_save = time.monotonic()
        last_saved, steps_this_run = self.position.step, 0
        try:
            while self.position.step < total:
                upcoming = self.position.step + 1  # the step about to be taken
                last = upcoming == total
                full_log = upcoming % cfg.train.log_interval == 0 or last
                record_stats = upcoming % cfg.train.stats_interval == 0 or last
                loss, lr, seconds, stop, save_due = self.train_step(record_stats)
                if not math.isfinite(loss):
                    self.rewind(loss, result)
                    continue
                self.position.step += 1
                self.position.cursor += 1
                steps_this_run += 1
                result.losses[self.position.step] = loss
                self.log(result, loss, lr, seconds, full_log, record_stats)
                if stop:
                    result.stopped_by_signal = True
                    result.checkpoint, last_saved = self.save(), self.position.step
                    if self.is_rank0:
                        who = self.stop.signal or "on another rank"
                        print(f"\nsignal {who}: saved {result.checkpoint}, exiting", flush=True)
                    break
                every = cfg.train.save_interval
                if save_due or (every and self.position.step % every == 0):
                    result.checkpoint, last_saved = self.save(), self.position.step
                if stop_after is not None and steps_this_run >= stop_after:
                    break
            if self.position.step != last_saved:
                result.checkpoint = self.save()
            if self.is_rank0:
                state = "finished" if self.position.step >= total else "stopped"
                write_status(
                    self.run_dir, state, self.position.step, total, signal=self.stop.signal
                )
        finally:
            self.batches.close()
            self.stop.restore()
            self.writer.close()
            if self.bar is not None:
                self.bar.close()
        result.step = self.position.step
        return result


def train(
    cfg: Config,
    run_dir: Path,
    *,
    allow_config_change: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train (or resume) the run in `run_dir`; every rank of the job calls this.

    `stop_after` ends the loop after that many steps of this invocation (tests use it to
    interrupt a run); a checkpoint is written on the way out.
    """
    trainer = Trainer(cfg, run_dir, allow_config_change=allow_config_change, progress=progress)
    return trainer.fit(stop_after)


def _zero_shot_tasks(cfg: Config) -> list[str]:
    """The `eval.suite` tasks when zero-shot evaluation runs during training; checked up front."""
    if not cfg.eval.every_n_steps:
        return []
    from megatron_dyt.eval.run import check_datasets, task_manager
    from megatron_dyt.eval.suites import expand

    tasks = expand(None, cfg.eval.suite)
    check_datasets(tasks, task_manager())
    return tasks


def _zero_shot(module: torch.nn.Module, cfg: Config, tokenizer, tasks: list[str]) -> dict[str, Any]:
    """Run the suite on the live model; the headline metric per task and their average."""
    from megatron_dyt.eval.adapter import make_lm
    from megatron_dyt.eval.run import evaluate
    from megatron_dyt.eval.suites import summarize

    dtype = next(module.parameters()).dtype
    lm = make_lm(module, cfg, tokenizer, _device(), dtype, cfg.eval.batch_size)
    module.eval()
    try:
        results = evaluate(lm, tasks, limit=cfg.eval.limit, bootstrap_iters=0)
    finally:
        module.train()
    if results is None:
        return {}
    summary = summarize(results["results"], tasks)
    out: dict[str, Any] = {f"eval/{r['task']}/{r['metric']}": r["value"] for r in summary["rows"]}
    out["eval/average"] = summary["average_headline"]
    return out


def _count_parameters(model: torch.nn.Module) -> int:
    """Parameters of the whole model (all TP shards, all pipeline stages)."""
    local = sum(
        getattr(p, "ds_numel", p.numel())  # ZeRO-3: the whole parameter, not the placeholder
        for p in model.parameters()
        if parallel.is_sharded(p) or ps.get_tensor_model_parallel_rank() == 0
    )
    total = torch.tensor([float(local)])
    if torch.cuda.is_available():
        total = total.cuda()
    group_ranks_dp0 = ps.get_data_parallel_rank() == 0
    total *= 1.0 if group_ranks_dp0 else 0.0
    dist.all_reduce(total)
    return int(total.item())


def _progress_bar(enabled: bool, start: int, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, desc="train")
