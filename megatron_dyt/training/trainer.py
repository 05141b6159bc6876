"""`megatron-dyt train`: the training loop around a DeepSpeed engine.

Data order: global batch c holds train samples [c·B, (c+1)·B) (B the global batch in sequences);
micro-batch j of data-parallel rank r takes samples c·B + (j·DP + r)·m … + m. A data cursor,
saved in every checkpoint, says which batch the next step takes: normally the step number, one
further for every batch left out after a NaN/Inf loss. The samples of a step do not depend on DP,
so resumed and rescaled runs see the same data; TP and PP peers of a rank read the same samples.
"""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_dyt import __version__, checkpoint, parallel
from megatron_dyt.config import Config, load_config
from megatron_dyt.errors import MegatronDyTError
from megatron_dyt.fileio import atomic_write
from megatron_dyt.layout import BatchLayout, batch_layout, data_parallel_size, run_layout
from megatron_dyt.training.engine import build_model, deepspeed_config, initialize
from megatron_dyt.training.metrics import MetricsWriter, NormStats, flops_per_token, peak_tflops
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


def _check_resume_layout(cfg: Config, folder: Path, world_size: int) -> bool:
    """Whether checkpoint `folder` must be resharded to resume at this run's layout.

    Without resume.reshard=true a different layout is an error that says what to do.
    """
    current = run_layout(cfg, world_size)
    if checkpoint.is_universal(folder):
        saved = None
    else:
        saved = checkpoint.saved_layout(folder)
        if current.loads_natively(saved):
            return False
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


def _config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


# ---- data --------------------------------------------------------------------------------------


class StepBatches:
    """The micro-batches of one optimizer step for this data-parallel rank."""

    def __init__(self, dataset, layout: BatchLayout, dp_rank: int, device: torch.device):
        self.dataset = dataset
        self.layout = layout
        self.dp_rank = dp_rank
        self.device = device

    def micro_batch(self, first_sample: int) -> tuple[torch.Tensor, torch.Tensor]:
        samples = [
            self.dataset[i] for i in range(first_sample, first_sample + self.layout.micro_batch)
        ]
        tokens = torch.stack([torch.as_tensor(s["tokens"], dtype=torch.long) for s in samples])
        labels = torch.stack([torch.as_tensor(s["labels"], dtype=torch.long) for s in samples])
        return tokens.to(self.device), labels.to(self.device)

    def for_step(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        lay = self.layout
        base = batch * lay.global_batch
        return [
            self.micro_batch(base + (j * lay.data_parallel + self.dp_rank) * lay.micro_batch)
            for j in range(lay.grad_accum)
        ]


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

    def agreed(self) -> bool:
        """True on every rank once any rank got a signal (one tiny all-reduce per step)."""
        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

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


def _train_step(engine, batches: list, pipeline: bool) -> float:
    if pipeline:
        loss = engine.train_batch(data_iter=iter(batches))
        return loss.item()
    losses = []
    for tokens, labels in batches:
        loss = engine(tokens, labels)
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    return _dp_mean(torch.stack(losses).mean())


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


def _scheduled_lr(engine) -> float:
    """The lr of the parameter groups without a multiplier: with `train.dyt_lr_multiplier` the
    DyT scalars' group runs at another lr, and it may sort first."""
    for group in engine.optimizer.param_groups:
        if group.get("lr_mult", 1.0) == 1.0:
            return group["lr"]
    return engine.get_lr()[0]


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
    from megatron_dyt.data import build_datasets, resolve_data
    from megatron_dyt.model import init_weights

    parallel.setup(cfg.parallel)
    parallel.init_deepspeed_comm()
    rank = dist.get_rank()
    is_rank0 = rank == 0
    run_dir = Path(run_dir)
    prepare_run_dir(cfg, run_dir, allow_config_change)

    dp = data_parallel_size(cfg.parallel, dist.get_world_size())
    layout = batch_layout(cfg, dp)
    ckpt_root = run_dir / "checkpoints"
    tag = checkpoint.find_latest(ckpt_root)
    resharded = tag is not None and _check_resume_layout(
        cfg, ckpt_root / tag, dist.get_world_size()
    )
    ds_config = deepspeed_config(cfg, layout)
    total_steps = cfg.train.train_steps

    tokenizer, _, _ = resolve_data(cfg)  # also checks the tokenizer fits model.vocab_size
    zero_shot_tasks = _zero_shot_tasks(cfg)
    eval_batches = (
        math.ceil(cfg.train.eval_samples / layout.global_batch) if cfg.train.eval_interval else 0
    )
    train_ds, valid_ds = build_datasets(
        cfg,
        tokenizer,
        # every skipped non-finite step moves the data cursor one batch further
        (total_steps + cfg.train.skip_nonfinite_steps) * layout.global_batch,
        max(1, eval_batches) * layout.global_batch,
    )

    if is_rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        # atomic: a run killed while writing must not leave a config its resume cannot read
        atomic_write(run_dir / "config.yaml", cfg.to_yaml())
        atomic_write(run_dir / "deepspeed_config.json", json.dumps(ds_config, indent=2) + "\n")
    dist.barrier()

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    init_weights(model, cfg)
    parameters = _count_parameters(model)
    engine = initialize(
        model,
        cfg,
        ds_config,
        lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.train.min_lr_ratio),
    )
    pipeline = cfg.parallel.pipeline > 1

    step, cursor, skipped = 0, 0, []

    def resume(tag: str, reshard: bool) -> dict[str, Any]:
        if not reshard:
            return checkpoint.load(engine, ckpt_root, tag)
        universal = checkpoint.universal_of(ckpt_root / tag, progress=is_rank0 and progress)
        return checkpoint.load_universal(engine, universal, cfg, layout.global_batch)

    if tag is not None:
        state = resume(tag, resharded)
        step, cursor, skipped = _position(state)
        if is_rank0 and state.get("weights_only"):
            print(
                f"starting from the weights in {ckpt_root / tag} (imported: fresh optimizer"
                " and learning-rate schedule)",
                flush=True,
            )
        elif is_rank0:
            how = " (resharded to this layout)" if resharded else ""
            print(f"resuming from {ckpt_root / tag} (step {step}){how}", flush=True)
    result = TrainResult(run_dir=run_dir, start_step=step, step=step)

    device = _device()
    dp_rank = ps.get_data_parallel_rank()
    batches = StepBatches(train_ds, layout, dp_rank, device)
    valid = (
        StepBatches(valid_ds, layout, dp_rank, device)
        if valid_ds is not None and eval_batches
        else None
    )
    stats = NormStats(model)
    writer = MetricsWriter(run_dir, cfg, enabled=is_rank0)
    stop = _StopFlag()
    world = dist.get_world_size()
    fpt = flops_per_token(cfg, parameters)
    peak = peak_tflops(cfg)
    tokens_per_step = layout.global_batch * cfg.model.seq_length
    bar = _progress_bar(is_rank0 and progress, step, total_steps)
    last_saved = step

    def save() -> Path:
        nonlocal last_saved
        client = {
            "step": step,
            "data_cursor": cursor,
            "consumed_samples": cursor * layout.global_batch,
            "skipped_batches": skipped,
            "layout": asdict(run_layout(cfg, world)),
        }
        folder = checkpoint.save(
            engine, ckpt_root, step, client, cfg, tokenizer.path, cfg.train.keep_checkpoints
        )
        last_saved = step
        return folder

    try:
        steps_this_run = 0
        while step < total_steps:
            while cursor in skipped:
                cursor += 1
            log_now = (step + 1) % cfg.train.log_interval == 0 or step + 1 == total_steps
            lr = _scheduled_lr(engine)  # the lr this step uses (the scheduler moves on after it)
            t0 = time.perf_counter()
            with stats.recording() if log_now else nullcontext():
                loss = _train_step(engine, batches.for_step(cursor), pipeline)
            elapsed = time.perf_counter() - t0
            if not math.isfinite(loss):
                good = checkpoint.find_latest(ckpt_root)
                if len(skipped) < cfg.train.skip_nonfinite_steps and good is not None:
                    skipped.append(cursor)
                    step, cursor, _ = _position(resume(good, good == tag and resharded))
                    result.losses = {k: v for k, v in result.losses.items() if k <= step}
                    writer.write(
                        step,
                        {
                            "event": "nonfinite_loss_rewind",
                            "loss": loss,
                            "skipped_batch": skipped[-1],
                        },
                    )
                    if is_rank0:
                        print(
                            f"\nloss is {loss} on data batch {skipped[-1]}: rewound to"
                            f" {ckpt_root / good} and leaving that batch out"
                            f" ({len(skipped)}/{cfg.train.skip_nonfinite_steps} skips used)",
                            flush=True,
                        )
                    if bar is not None:
                        bar.n = step
                    continue
                where = (
                    f"the last good checkpoint is '{ckpt_root / good}'"
                    if good
                    else "no checkpoint was saved yet"
                )
                if is_rank0:
                    write_status(run_dir, "diverged", step, total_steps)
                raise TrainingError(
                    f"loss is {loss} at step {step + 1}: training diverged and stopped; {where}."
                    " Lower train.lr, raise warm-up or lower the DyT α₀ (model.norm.alpha_*);"
                    " train.skip_nonfinite_steps=N rewinds and skips up to N such batches"
                )
            step += 1
            cursor += 1
            steps_this_run += 1
            result.losses[step] = loss
            grad_norm = _grad_norm(engine)
            tps = tokens_per_step / elapsed
            record: dict[str, Any] = {
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tps,
                "step_time_s": elapsed,
                "tflops_per_gpu": fpt * tps / world / 1e12,
                "mfu": (fpt * tps / world / 1e12) / peak if peak else None,
                "consumed_samples": cursor * layout.global_batch,
            }
            if log_now:
                record.update({f"norm/{k}": v for k, v in stats.gather().items()})
            if (
                valid is not None
                and cfg.train.eval_interval
                and (step % cfg.train.eval_interval == 0 or step == total_steps)
            ):
                record["valid_loss"] = _evaluate(engine, valid, eval_batches, pipeline)
                result.valid_losses[step] = record["valid_loss"]
            if zero_shot_tasks and (step % cfg.eval.every_n_steps == 0 or step == total_steps):
                record.update(_zero_shot(engine.module, cfg, tokenizer, zero_shot_tasks))
            if log_now or "valid_loss" in record:
                writer.write(step, record)
            if bar is not None:
                bar.set_postfix(
                    loss=f"{loss:.4f}",
                    lr=f"{lr:.2e}",
                    gnorm=f"{grad_norm:.3f}" if grad_norm is not None else "-",
                    tok_s=f"{tps:,.0f}",
                    refresh=False,
                )
                bar.update(1)
            if stop.agreed():
                result.stopped_by_signal = True
                result.checkpoint = save()
                if is_rank0:
                    print(
                        f"\nsignal {stop.signal or 'on another rank'}: saved {result.checkpoint}, exiting",
                        flush=True,
                    )
                break
            if cfg.train.save_interval and step % cfg.train.save_interval == 0:
                result.checkpoint = save()
            if stop_after is not None and steps_this_run >= stop_after:
                break
        if step != last_saved:
            result.checkpoint = save()
        if is_rank0:
            state = "finished" if step >= total_steps else "stopped"
            write_status(run_dir, state, step, total_steps, signal=stop.signal)
    finally:
        stop.restore()
        writer.close()
        if bar is not None:
            bar.close()
    result.step = step
    return result


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


def _position(state: dict[str, Any]) -> tuple[int, int, list[int]]:
    """(step, data cursor, skipped batches) saved in a checkpoint's client state."""
    step = int(state["step"])
    return step, int(state.get("data_cursor", step)), list(state.get("skipped_batches", []))


def _count_parameters(model: torch.nn.Module) -> int:
    """Parameters of the whole model (all TP shards, all pipeline stages)."""
    local = sum(
        p.numel()
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
