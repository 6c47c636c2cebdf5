"""train stage: fit the configured model on the prepared train split, log curves, checkpoint.

The whole data set lives on the training device as stored (uint8 pixels, token ids, raw
series, tabular rows) when it fits, batches are drawn with a seeded generator, and on CPU
the run is deterministic: the same params and data give the same weights and metrics.
Sequence batches are cut to their longest row and carry a mask from the lengths; only
images are augmented. On CUDA the step runs in bf16 autocast, images as channels_last
tensors. Classification logs loss and accuracy per epoch; regression logs loss (on the
standardised target) and RMSE in target units.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import typer
from torch import nn
from torch.nn import functional as F

from pipeline.artifacts import atomic_path, params_hash
from pipeline.checkpoint import DEFAULT_CHECKPOINT, Checkpoint, save_checkpoint
from pipeline.dataset import DEFAULT_DIR, Meta, Split, load_meta, load_split
from pipeline.distributed import World, all_sum, process_group, shard_batches, world_from_env
from pipeline.errors import StageError, exit_on_stage_error, run_command, step
from pipeline.models import ModelSpec, build_module, network_output
from pipeline.params import ModelParams, TrainParams, as_dict, is_import_path, load_with_overrides
from pipeline.user_model import check_output

DEFAULT_LIVE_DIR = Path("dvclive")
# The losses each task can train with; train.loss auto picks the first.
TASK_LOSSES = {"classification": ("cross_entropy",), "regression": ("mse", "huber")}


@dataclass(frozen=True)
class EpochStats:
    """One epoch: the loss, and accuracy (classification) or RMSE in target units
    (regression), of the train and validation splits; the other task's figures are None."""

    train_loss: float
    val_loss: float
    samples_per_s: float
    train_acc: float | None = None
    val_acc: float | None = None
    train_rmse: float | None = None
    val_rmse: float | None = None

    def logged(self) -> dict[str, float]:
        """The figures this task has, by dvclive name (train/loss, val/rmse, ...)."""
        names = ("loss", "acc", "rmse")
        values = {f"{s}/{n}": getattr(self, f"{s}_{n}") for s in ("train", "val") for n in names}
        return {name: round(value, 6) for name, value in values.items() if value is not None}

    def line(self) -> str:
        """``train loss 0.1234 acc 0.9500 | val loss ... | 1,234 samples/s``"""
        parts: dict[str, list[str]] = {"train": [], "val": []}
        for name, value in self.logged().items():
            split, metric = name.split("/")
            parts[split].append(f"{metric} {value:.4f}")
        splits = [f"{split} {' '.join(figures)}" for split, figures in parts.items()]
        return " | ".join([*splits, f"{self.samples_per_s:,.0f} samples/s"])


@dataclass(frozen=True)
class Objective:
    """The task's loss, and its score: accuracy, or RMSE in target units."""

    loss: str  # cross_entropy, mse or huber
    label_smoothing: float = 0.0
    target_mean: float = 0.0
    target_std: float = 1.0

    @property
    def metric(self) -> str:
        return "acc" if self.loss == "cross_entropy" else "rmse"

    def __call__(
        self, out: torch.Tensor, y: torch.Tensor, reduction: str = "mean", smooth: bool = True
    ) -> torch.Tensor:
        if self.loss == "cross_entropy":
            smoothing = self.label_smoothing if smooth else 0.0
            return F.cross_entropy(out, y, label_smoothing=smoothing, reduction=reduction)
        # On the standardised target: the loss scale, the learning rate that suits it and
        # huber's delta of 1 do not depend on the target's units.
        scale = self.target_std or 1.0
        pred, true = (out - self.target_mean) / scale, (y - self.target_mean) / scale
        fn = F.mse_loss if self.loss == "mse" else F.huber_loss
        return fn(pred, true, reduction=reduction)

    def score_sum(self, out: torch.Tensor, y: torch.Tensor) -> float:
        """Correct predictions, or squared errors in target units, summed over a batch."""
        if self.metric == "acc":
            return float((out.argmax(1) == y).sum())
        return float(((out.double() - y.double()) ** 2).sum())

    def score(self, total: float, count: float) -> float:
        return total / count if self.metric == "acc" else math.sqrt(total / count)


def build_objective(params: TrainParams, meta: Meta) -> Objective:
    """train.loss for the data's task; a loss of the other task is a StageError."""
    allowed = TASK_LOSSES[meta.task]
    loss = allowed[0] if params.loss == "auto" else params.loss
    if loss not in allowed:
        other = "classification" if meta.is_regression else "regression"
        raise StageError(
            f"train.loss {loss} is a {other} loss but the prepared data is a {meta.task} task; "
            f"set it to auto or {' or '.join(allowed)}"
        )
    if meta.is_regression and params.label_smoothing:
        raise StageError(
            f"train.label_smoothing {params.label_smoothing} applies to classification only, "
            "but the prepared data is a regression task; set it to 0"
        )
    return Objective(loss, params.label_smoothing, meta.target_mean, meta.target_std)


def model_spec(meta: Meta, params: ModelParams) -> ModelSpec:
    """What the checkpoint needs to rebuild the model: the params and the data's shape."""
    return ModelSpec(
        name=params.name,
        input_shape=meta.input_shape,
        num_classes=meta.num_outputs,
        width=params.width,
        hidden=params.hidden,
        kind=meta.kind,
        vocab_size=meta.vocab_size,
        layers=params.layers,
        bidirectional=params.bidirectional,
        dropout=params.dropout,
        heads=params.heads,
        task=meta.task,
        batch_norm=params.batch_norm,
        options=dict(params.options),
    )


# ---------------------------------------------------------------- setup


def pick_device(requested: str, world: World) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise StageError("train.device is cuda but no CUDA GPU is visible to torch")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(world.local_rank)
    return torch.device("cuda", world.local_rank)


@dataclass(frozen=True)
class Tensors:
    """A split as tensors; ``lengths`` (sequences) always on the training device."""

    x: torch.Tensor
    y: torch.Tensor
    lengths: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.y)


def _to_device(split: Split, device: torch.device) -> Tensors:
    x, y = torch.from_numpy(split.x), torch.from_numpy(split.y)
    lengths = None if split.lengths is None else torch.from_numpy(split.lengths).to(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if x.element_size() * x.numel() > free // 2:  # leave room for activations; stream
            return Tensors(x.pin_memory(), y.pin_memory(), lengths)
    return Tensors(x.to(device), y.to(device), lengths)


def build_optimizer(model: nn.Module, params: TrainParams) -> torch.optim.Optimizer:
    if params.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=params.lr,
            momentum=params.momentum,
            nesterov=True,
            weight_decay=params.weight_decay,
        )
    factory = torch.optim.AdamW if params.optimizer == "adamw" else torch.optim.Adam
    return factory(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)


def build_schedule(
    optimizer: torch.optim.Optimizer, params: TrainParams, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if params.schedule == "onecycle":
        # OneCycleLR divides by zero when its warm-up ends at step 0, which a quarter of a
        # 4-step run does; such a run warms up a little longer.
        pct_start = 0.3 if total_steps == 4 else 0.25
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=params.lr, total_steps=total_steps, pct_start=pct_start
        )
    if params.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def epoch_batches(order: torch.Tensor, batch_size: int, world: World) -> list[torch.Tensor]:
    """This rank's batches of an epoch; a last batch of one row joins the one before,
    since BatchNorm1d cannot take a training step on a single row."""
    batches = shard_batches(order, batch_size, world)
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def random_translate(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Shift each image by up to ``pad`` pixels in each direction (zero fill)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)
    cols = dx[:, None] + torch.arange(w, device=x.device)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


# ---------------------------------------------------------------- training


class Trainer:
    def __init__(
        self, meta: Meta, model_params: ModelParams, params: TrainParams, world: World
    ) -> None:
        self.params = params
        self.world = world
        self.device = pick_device(params.device, world)
        torch.manual_seed(params.seed)
        if self.device.type == "cpu":
            torch.use_deterministic_algorithms(True)
        self.meta = meta
        self.objective = build_objective(params, meta)
        self.spec = model_spec(meta, model_params)
        self.model = build_module(self.spec, meta).to(self.device)
        self.cuda = self.device.type == "cuda"
        self.images = meta.kind == "image"
        self.augment = params.augment and self.images
        if self.cuda and self.images:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.step_model = self._wrap_for_ddp(self.model)
        # The batch order must agree across ranks; the augmentation must not.
        self.order_generator = torch.Generator().manual_seed(params.seed)
        self.augment_generator = torch.Generator(device=self.device).manual_seed(
            params.seed + world.rank
        )

    def _wrap_for_ddp(self, model: nn.Module) -> nn.Module:
        if not self.world.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        if self.cuda:  # SyncBatchNorm needs CUDA; on CPU each rank keeps its own BN statistics
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            return DistributedDataParallel(model, device_ids=[self.device.index])
        return DistributedDataParallel(model)

    def _batch(self, data: Tensors, index: torch.Tensor | slice) -> tuple[list, torch.Tensor]:
        """The model's inputs for the rows ``index`` and their labels, on the device."""
        x, y = data.x[index], data.y[index].to(self.device, non_blocking=True)
        if data.lengths is None:
            x = x.to(self.device, non_blocking=True)
            if self.cuda and self.images:
                x = x.contiguous(memory_format=torch.channels_last)
            return [x], y
        # Cut to the batch's longest row: the padding after it is masked anyway.
        lengths = data.lengths[index]
        steps = int(lengths.max())
        x = x[..., :steps].to(self.device, non_blocking=True)
        mask = torch.arange(steps, device=self.device)[None, :] < lengths[:, None]
        return [x, mask.to(torch.int64)], y

    def _forward(self, model: nn.Module, inputs: list) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda):
            return model(*inputs).float()

    @step("fit")
    def fit(self, train: Split, val: Split, on_epoch) -> None:  # noqa: ANN001 - callback
        train_data, val_data = _to_device(train, self.device), _to_device(val, self.device)
        if is_import_path(self.spec.name):
            self._check_user_output(train_data)
        rows = torch.arange(len(train_data))
        steps_per_epoch = len(epoch_batches(rows, self.params.batch_size, self.world))
        optimizer = build_optimizer(self.step_model, self.params)
        schedule = build_schedule(optimizer, self.params, steps_per_epoch * self.params.epochs)
        metric = self.objective.metric
        for epoch in range(1, self.params.epochs + 1):
            started = time.perf_counter()
            loss, score = self._train_epoch(train_data, optimizer, schedule, epoch)
            elapsed = time.perf_counter() - started
            val_loss, val_score = self.evaluate(val_data)
            stats = EpochStats(
                train_loss=loss,
                val_loss=val_loss,
                samples_per_s=len(train_data) / elapsed,
                **{f"train_{metric}": score, f"val_{metric}": val_score},
            )
            on_epoch(epoch, stats)

    @torch.no_grad()
    def _check_user_output(self, data: Tensors) -> None:
        """A factory's module of the wrong output shape fails here, in one line, not as a
        shape error deep inside the loss. Eval mode: no batch-norm statistics move."""
        self.model.eval()
        inputs, _ = self._batch(data, slice(0, self.params.batch_size))
        output = network_output(self.model, *inputs)
        check_output(output, len(inputs[0]), self.meta, self.spec.name)

    def _train_epoch(self, data: Tensors, optimizer, schedule, epoch: int) -> tuple[float, float]:  # noqa: ANN001
        from tqdm import tqdm

        self.step_model.train()
        order = torch.randperm(len(data), generator=self.order_generator)
        batches = epoch_batches(order, self.params.batch_size, self.world)
        total_loss, score, seen = 0.0, 0.0, 0
        bar = tqdm(
            batches,
            desc=f"epoch {epoch}/{self.params.epochs}",
            unit="batch",
            leave=False,
            disable=not self.world.is_main,
        )
        for index in bar:
            inputs, yb = self._batch(data, index)
            if self.augment:
                inputs[0] = random_translate(inputs[0], self.augment_generator)
            out = self._forward(self.step_model, inputs)
            loss = self.objective(out, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(yb)
            score += self.objective.score_sum(out.detach(), yb)
            seen += len(yb)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        total_loss, score, seen = all_sum([total_loss, score, seen], self.world, self.device)
        return total_loss / seen, self.objective.score(score, seen)

    @torch.no_grad()
    def evaluate(self, data: Tensors) -> tuple[float, float]:
        """Loss (without label smoothing) and score of a split. Every rank scores the whole
        validation split, so all ranks agree without talking."""
        self.model.eval()
        total_loss, score = 0.0, 0.0
        for start in range(0, len(data), 512):
            inputs, yb = self._batch(data, slice(start, start + 512))
            out = self._forward(self.model, inputs)
            total_loss += float(self.objective(out, yb, reduction="sum", smooth=False))
            score += self.objective.score_sum(out, yb)
        return total_loss / len(data), self.objective.score(score, len(data))


def train(
    model_params: ModelParams,
    params: TrainParams,
    data_dir: Path = DEFAULT_DIR,
    checkpoint_path: Path = DEFAULT_CHECKPOINT,
    live_dir: Path = DEFAULT_LIVE_DIR,
) -> list[EpochStats]:
    """Train, log every epoch with dvclive, and write the checkpoint; all atomically.

    Under torchrun every rank trains; only rank 0 logs and writes.
    """
    with step("load data"):
        meta = load_meta(data_dir)
        train_split = load_split("train", data_dir, meta)
        val_split = load_split("val", data_dir, meta)
    world = world_from_env()
    history: list[EpochStats] = []
    device_type = "cuda" if params.device != "cpu" and torch.cuda.is_available() else "cpu"
    with process_group(world, torch.device(device_type)):
        with step("build model"):
            trainer = Trainer(meta, model_params, params, world)
        if not world.is_main:
            trainer.fit(train_split, val_split, lambda _, stats: history.append(stats))
            return history
        with atomic_path(live_dir) as tmp_live:
            _fit_logged(trainer, train_split, val_split, tmp_live, history)
            resolved = {"model": as_dict(model_params), "train": as_dict(params)}
            save_checkpoint(
                Checkpoint(
                    spec=trainer.spec,
                    class_names=meta.class_names,
                    mean=meta.mean,
                    std=meta.std,
                    state_dict=trainer.model.state_dict(),
                    data_fingerprint=meta.fingerprint,
                    params=resolved,
                    params_hash=params_hash({**resolved, "data": meta.fingerprint}),
                    meta=meta,
                ),
                checkpoint_path,
            )
    return history


def _fit_logged(
    trainer: Trainer, train_split: Split, val_split: Split, live_dir: Path, history: list
) -> None:
    from dvclive import Live

    epochs = trainer.params.epochs
    with Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=False, report=None) as live:

        def on_epoch(epoch: int, stats: EpochStats) -> None:
            history.append(stats)
            for name, value in stats.logged().items():
                live.log_metric(name, value)
            live.next_step()
            typer.echo(f"epoch {epoch}/{epochs}: {stats.line()}", err=True)

        trainer.fit(train_split, val_split, on_epoch)


@exit_on_stage_error
def command(
    params_file: Annotated[
        Path | None,
        typer.Option(
            "--params",
            help="params.yaml to read `model` and `train` from (default: ./params.yaml when "
            "it exists, else the built-in defaults, which are params.yaml's).",
        ),
    ] = None,
    data_dir: Annotated[Path, typer.Option(help="Prepared data directory.")] = DEFAULT_DIR,
    checkpoint: Annotated[
        Path, typer.Option(help="Where to write the checkpoint.")
    ] = DEFAULT_CHECKPOINT,
    live_dir: Annotated[
        Path, typer.Option(help="dvclive directory for per-epoch metrics.")
    ] = DEFAULT_LIVE_DIR,
) -> None:
    """Train the configured model and write a weights-only checkpoint."""
    model_params = load_with_overrides("model", ModelParams, params_file)
    train_params = load_with_overrides("train", TrainParams, params_file)
    history = train(model_params, train_params, data_dir, checkpoint, live_dir)
    if world_from_env().is_main:
        last = history[-1]
        metric, value = ("rmse", last.val_rmse) if last.val_acc is None else ("acc", last.val_acc)
        typer.echo(f"trained {model_params.name}: val {metric} {value:.4f} -> {checkpoint}")


def main() -> None:
    run_command(command)


if __name__ == "__main__":
    main()
