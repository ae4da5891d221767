"""What does a distribution strategy cost or buy on this machine? Training-step throughput and
peak memory per rank of ``--strategy`` on ``--nproc`` ranks, next to one plain process training
on the same global batch, measured in the same invocation.

Each configuration runs the engine's own loop (:func:`trainer.engine.pretrain`) as a real job:
N ranks are started by ``torchrun`` exactly as ``dinoflow pretrain --nproc N`` starts them, one
plain process for ``single``. The images are random uint8 squares of ``crops.load_size`` made
on the fly, so the figure is the step's (data loader, augmentation, forward, backward,
collectives, optimizer, EMA), not a disk's. Throughput is the global images of the steps after
``--warmup`` over their summed step times (the engine's per-step clock, averaged over ranks, so
checkpoint writes are not counted). Peak memory is each rank process's peak resident set
(``VmHWM``; ``getrusage``'s ``ru_maxrss`` would report the launcher's peak for a child started
by fork and exec). ``--threads`` cores are shared out: ``threads // N`` per rank, all of them
for ``single``.

``optim.batch_size`` is per rank, as in training: the global batch is ``batch_size x N`` and the
single process trains on that whole global batch. DeepSpeed's CPU communication op is compiled
once into ``TORCH_EXTENSIONS_DIR`` (default here ``~/.cache/dinoflow/torch_extensions``, shared
with the tests). Prints one table; asserts nothing.

``--probe`` instead times, in this one process on ``--device``, the engine's ``train_step`` on
synthetic crops and masks already on the device (all losses on; bf16 autocast on CUDA, as the
engine trains) next to issue 11's plain ceiling probe (``benchmarks/step_probe.py``) at the same
recipe sizes, and prints img/s, TFLOP/s, peak memory and ours/probe (over the eager probe). The
engine's step uses the engine's AdamW (``optim.fused_adamw``), the probe torch's default one, and is
queued as the loop queues it (``optim.lagged_loss_read``: the losses of a step read while the next
runs, so neither waits for the host between steps).
``--compile`` adds both again with every transformer block compiled (``model.compile_blocks``
and the loss tails, ``loss.compile``, for ours; the same per-block compile for the probe's
blocks, which has no losses; the warm-up steps absorb the
compilation); a row whose compilation fell back to eager says so. ``--cuda-graphs`` adds dinoflow's
compiled step once more with its blocks replayed as CUDA graphs (``model.compile_mode=reduce-overhead``;
the row counts the graphs inductor compiled without them: on CPU, all). ``--autotune`` adds it once
more in ``model.compile_mode=max-autotune-no-cudagraphs``: inductor times its own matrix-product
kernels (templates with the element-wise work after a product fused in) against the library's and
keeps the fastest, which takes minutes to compile on a GPU. Before the rows, the loop's
batch preparation (``make_batch``: the multi-crop augmentation on the device from uint8
images of ``crops.load_size``, the block masks on the host) is timed; printed last, its img/s alone,
with the fastest dinoflow row's step after it (one, then the other), and as the loop runs it: the
compiled row (eager without ``--compile``), and the CUDA-graph row, are timed once more with each
step's batch prepared during the step before, once its work is queued (``queue_step``'s
``while_waiting``), new crops and masks every step, then again with that batch made on a second
CUDA stream (``data.side_stream``; off CUDA the same loop); a loop that fails is reported, and its
row is left out of the rounds. ``--rounds R`` keeps the compiled rows' steps
alive and, after the rows, times them again in R alternating rounds (each round the compiled
probe and every compiled dinoflow row back to back, the order reversed every other round), so
that a ratio ours/probe near 1 is not decided by the card's clocks drifting between rows timed
minutes apart; it prints each row's ratio, median and range over the rounds. A row's peak memory on
a GPU is the allocator's peak over what was allocated when the row began (the synthetic batch,
the rows kept for ``--rounds``). ``--json`` also writes every row, as it completes, to a file.

    python benchmarks/train_step.py --strategy deepspeed --nproc 2 --steps 10 --config tiny
    python benchmarks/train_step.py --probe --device cpu --config tiny --steps 3 --warmup 1
    python benchmarks/train_step.py --probe --compile --cuda-graphs --device cuda --config vits14 -- optim.batch_size=128
    python benchmarks/train_step.py --strategy fsdp2 --nproc 2 -- optim.batch_size=32 crops.num_local_crops=2
"""

from __future__ import annotations

import argparse
import functools
import gc
import gzip
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from unittest import mock

import torch
from torch._dynamo.utils import counters

from gpu_gaps import gap_report  # this script's folder is first on sys.path
from gpu_summary import (  # this script's folder is first on sys.path
    TIMELINE_MARK,
    preparation_text,
    rounds_text,
    row_notes,
)
from memory_peak import record_peak  # this script's folder is first on sys.path
from step_probe import ProbeShape, ProbeViT, probe_flops_per_image, probe_shape, probe_step  # this script's folder is first on sys.path
from dinoflow.config import PretrainConfig, load_config
from dinoflow.progress import progress
from dinoflow.storage import Storage
from dinoflow.tracking import NullTracker

if TYPE_CHECKING:
    from torch import Tensor

    from trainer.batches import CropBatch
    from trainer.data.augment import MultiCrop

STRATEGIES = ("single", "fsdp2", "deepspeed")
EXTENSIONS = str(Path.home() / ".cache" / "dinoflow" / "torch_extensions")
COLUMNS = ("strategy", "ranks", "global_batch", "img_per_s", "vs_single", "peak_mib_per_rank")


LOOP_KEYS = ("loop_img_per_s", "loop_side_stream_img_per_s", "loop_error")  # a row's figures as the loop runs


class Timed(NamedTuple):
    """One ``--probe`` row's measurement: seconds per step, whether its compilation fell back to
    eager, the seconds per step as the loop runs it (dinoflow's rows with a batch preparation), the
    step itself (with its networks: kept alive for ``--rounds``), and why the loop's timing failed
    (the row's own figure stands)."""

    seconds: float
    fell_back: bool
    loop_seconds: dict[str, float] | None
    step: Callable[[], None]
    loop_error: str | None = None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategy", choices=STRATEGIES, default="deepspeed")
    parser.add_argument("--nproc", type=int, default=2, help="ranks of --strategy (1 for single)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps, after the warm-up")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps (allocation, first collectives)")
    parser.add_argument("--config", default="tiny", help="pretraining preset name or YAML path")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="cores shared by the ranks of one configuration")
    parser.add_argument("--probe", action="store_true",
                        help="instead: dinoflow's train_step next to the plain ceiling probe (issue 11), one process")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="--probe's device")
    parser.add_argument("--compile", action="store_true",
                        help="--probe: also time both steps compiled (model.compile_blocks, loss.compile)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="--probe --compile: also time dinoflow's compiled step with its blocks' kernels "
                             "replayed as CUDA graphs (model.compile_mode=reduce-overhead)")
    parser.add_argument("--autotune", action="store_true",
                        help="--probe --compile: also time dinoflow's compiled step with autotuned matrix products "
                             "(model.compile_mode=max-autotune-no-cudagraphs; minutes of compilation on a GPU)")
    parser.add_argument("--subset-drop-above", type=float, default=None, metavar="RATE",
                        help="--probe --compile: also time dinoflow's compiled step (with --cuda-graphs as CUDA "
                             "graphs) with stochastic depth in its subset form above RATE instead of "
                             "trainer.models.layers.SUBSET_DROP_ABOVE (e.g. 0.05: ViT-S/14's rate 0.1 skips its "
                             "dropped rows instead of masking them)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="--probe --compile: then this many alternating rounds of --steps steps of the compiled "
                             "probe and each compiled dinoflow row (kept alive for it), so that each ratio ours/probe "
                             "is measured in one stretch of the card's clocks; the median and range over rounds")
    parser.add_argument("--json", default="", help="--probe: also write the figures to this JSON file, row by row")
    parser.add_argument("--profile", default="",
                        help="--probe: profile two more steps of dinoflow's last row (compiled with --compile) "
                             "and write the kernel-time table (operator time on CPU; on a GPU also what is "
                             "alive at the memory peak) to this file, the probe's last row's to FILE_probe")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)  # a rank: write results to this folder
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the preset (optim.batch_size per rank)")
    args = parser.parse_args()
    if args.nproc < 1 or args.steps < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--nproc, --steps and --threads must be at least 1, --warmup at least 0")
    if (args.compile or args.json or args.profile) and not args.probe:
        parser.error("--compile, --json and --profile go with --probe")
    if (args.cuda_graphs or args.autotune or args.subset_drop_above is not None or args.rounds) and not args.compile:
        parser.error("--cuda-graphs, --autotune, --subset-drop-above and --rounds go with --probe --compile")
    if args.rounds < 0:
        parser.error(f"--rounds takes a count of at least 0, got {args.rounds}")
    if args.subset_drop_above is not None and not 0 <= args.subset_drop_above < 1:
        parser.error(f"--subset-drop-above takes a rate in [0, 1), got {args.subset_drop_above}")
    if args.compile and args.warmup < 1:
        parser.error("--compile needs --warmup of at least 1: the first step compiles")
    if (args.strategy == "single") != (args.nproc == 1) and not args.worker and not args.probe:
        parser.error("--strategy single runs on --nproc 1, and a distributed strategy on --nproc 2 or more")
    return args


class RandomImages(torch.utils.data.Dataset):
    """``length`` random uint8 images ``(3, load_size, load_size)``, image ``i`` seeded by ``i``
    (``load_size`` as the data sets name it: the high-resolution phase's reads set it)."""

    def __init__(self, length: int, load_size: int) -> None:
        self.length, self.load_size = length, load_size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        from trainer.data.datasets import Sample

        generator = torch.Generator().manual_seed(index)
        image = torch.randint(0, 256, (3, self.load_size, self.load_size), generator=generator, dtype=torch.uint8)
        return Sample(image=image, label=-1, key=f"random{index}")


class StepClock(NullTracker):
    """Keeps the engine's per-step ``images_per_second`` (rank 0's tracker; its clock is the ranks' mean)."""

    def __init__(self) -> None:
        self.images_per_second: dict[int, float] = {}

    def log_metrics(self, metrics: Mapping[str, float], step: int, force: bool = False) -> None:
        if "images_per_second" in metrics:
            self.images_per_second[step] = metrics["images_per_second"]


def peak_rss_mib() -> float:
    """This process's peak resident set since it was exec'd, in MiB (Linux ``VmHWM``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory is measured on Linux only")


def worker(args: argparse.Namespace) -> None:
    """One rank (or the single process): ``warmup + steps`` steps of ``pretrain``, then its figures
    to ``rank<R>.json`` in ``args.worker``."""
    from trainer.data.datasets import collate_samples
    from trainer.engine import pretrain

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    folder = Path(args.worker)
    total = args.warmup + args.steps
    cfg = load_config(PretrainConfig, args.config, [
        *args.overrides, f"out={folder / 'run'}", f"max_steps={total}", f"checkpoint_every={total}",
        "eval.every_steps=0"])
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    step_images = cfg.optim.batch_size * world_size * cfg.optim.grad_accumulation  # the global batch
    clock = StepClock()
    pretrain(cfg, RandomImages(step_images, cfg.crops.load_size), collate_samples, Storage(), tracker=clock)
    rank = int(os.environ.get("RANK", "0"))
    result: dict[str, Any] = {"rank": rank, "peak_mib": peak_rss_mib()}
    if rank == 0:
        timed = [clock.images_per_second[step] for step in range(args.warmup + 1, total + 1)]
        # each step's seconds are step_images / its img/s: the timed steps' images over their time
        result.update(global_batch=step_images, img_per_s=len(timed) / sum(1 / ips for ips in timed))
    Storage().write_bytes(str(folder / f"rank{rank}.json"), json.dumps(result).encode())


def measure(strategy: str, nproc: int, per_rank_batch: int, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Start one configuration (as ``dinoflow pretrain --nproc`` starts ranks) and collect its figures."""
    folder.mkdir(parents=True)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                if nproc > 1 else [sys.executable])
    command = [*launcher, str(Path(__file__).resolve()), "--worker", str(folder), "--config", args.config,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--",
               *args.overrides, f"distributed.strategy={strategy}", f"optim.batch_size={per_rank_batch}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.threads // nproc)))
    env.setdefault("TORCH_EXTENSIONS_DIR", EXTENSIONS)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a fresh job, even when this script runs inside one
    log = folder / "log.txt"
    with open(log, "wb") as output:
        done = subprocess.run(command, env=env, stdout=output, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        raise SystemExit(f"{strategy} on {nproc} rank(s) failed ({done.returncode}):\n"
                         f"{log.read_text(errors='replace')[-4000:]}")
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(nproc)]
    return {"strategy": strategy, "ranks": nproc, "global_batch": ranks[0]["global_batch"],
            "img_per_s": ranks[0]["img_per_s"], "peak_mib": [r["peak_mib"] for r in ranks]}


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per configuration, whitespace-separated; per-rank peaks joined by commas."""
    single = rows[0]["img_per_s"]
    lines = [f"{COLUMNS[0]:<10} {COLUMNS[1]:>5} {COLUMNS[2]:>12} {COLUMNS[3]:>9} {COLUMNS[4]:>9}  {COLUMNS[5]}"]
    for row in rows:
        peaks = ",".join(f"{mib:.0f}" for mib in row["peak_mib"])
        lines.append(f"{row['strategy']:<10} {row['ranks']:>5} {row['global_batch']:>12} {row['img_per_s']:>9.1f} "
                     f"{row['img_per_s'] / single:>9.2f}  {peaks}")
    return "\n".join(lines)


def write_figures(path: str, figures: Mapping[str, Any]) -> None:
    """``figures`` as JSON at ``path`` (nothing where it is empty), written whole (``Storage``'s temp
    file and rename). The GPU check's steps call it as they go: one its timeout stops keeps its last
    complete write, which ``gpu_summary.py`` reads."""
    if path:
        Storage().write_bytes(path, json.dumps(figures, indent=2).encode())


def time_steps(step: Callable[[], None], args: argparse.Namespace, device: torch.device) -> float:
    """Seconds per step of ``step`` over ``args.steps`` after ``args.warmup`` untimed ones."""
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    tick = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - tick) / args.steps


def peak_mib(device: torch.device, since: int = 0) -> float:
    """Peak memory so far: the CUDA allocator's on a GPU, over the ``since`` bytes allocated before
    (what a row found allocated is not its own), the process's peak resident set on CPU."""
    return (torch.cuda.max_memory_allocated(device) - since) / 2**20 if device.type == "cuda" else peak_rss_mib()


def probe(args: argparse.Namespace) -> None:
    """Time the ceiling probe and dinoflow's ``train_step`` (all losses, synthetic crops and masks on
    the device) at the recipe's sizes, in this process, eager and with ``--compile`` also with
    compiled blocks; print one row per measurement as it completes and keep ``--json`` up to date,
    so a run stopped by a timeout still leaves the rows it finished."""
    from gpu_correctness import synthetic_batch, to_device

    device = torch.device(args.device)
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    batch, crops = cfg.optim.batch_size, cfg.crops
    crop_batch = to_device(synthetic_batch(cfg), device)
    shape = probe_shape(cfg)
    flops = probe_flops_per_image(shape)
    report: dict[str, Any] = {
        "config": args.config, "overrides": args.overrides, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__, "batch": batch, "num_local_crops": crops.num_local_crops,
        "masked_rows": shape.masked_rows, "gflop_per_image": flops / 1e9, "steps": args.steps,
        "warmup": args.warmup, "rows": []}
    print(f"\nTraining step vs ceiling probe, preset {args.config!r} on {device} ({report['device_name']}), "
          f"batch {batch}, {crops.num_local_crops} local crops, {shape.masked_rows} masked patches, "
          f"{flops / 1e9:.3f} GFLOP/image; torch "
          f"{torch.__version__}; {args.steps} timed steps after {args.warmup} warm-up"
          + ("; CPU peak is the process's peak RSS, so each row includes the rows before it"
             if device.type == "cpu" else ""))
    print(f"{'step':<18} {'img_per_s':>10} {'tflop_per_s':>12} {'peak_mib':>9} {'ours_vs_probe':>14}", flush=True)
    prepare = batch_preparation(*preparation_inputs(device, cfg), cfg)
    # first, so that a row that fails (the last, experimental ones) cannot take this figure with it
    preparation = time_steps(prepare, args, device)
    measures: dict[str, Callable[[], Timed]] = {
        "probe": lambda: time_probe(args, device, False, shape, crop_batch,
                                    "" if args.compile else probe_profile_path(args.profile)),
        "dinoflow": lambda: time_dinoflow(args, device, False, crop_batch, "" if args.compile else args.profile,
                                          prepare=None if args.compile else prepare)}
    if args.compile:
        measures.update({
            "probe_compiled": lambda: time_probe(args, device, True, shape, crop_batch,
                                                 probe_profile_path(args.profile)),
            "dinoflow_compiled": lambda: time_dinoflow(args, device, True, crop_batch, args.profile, prepare=prepare)})
    if args.cuda_graphs:
        measures["dinoflow_cudagraphs"] = lambda: time_dinoflow(args, device, True, crop_batch, mode="reduce-overhead",
                                                                prepare=prepare)
    subset_mode = "reduce-overhead" if args.cuda_graphs else "default"  # the fastest form of the rows beside it
    if args.subset_drop_above is not None:
        measures["dinoflow_subset"] = lambda: time_dinoflow(args, device, True, crop_batch, mode=subset_mode,
                                                            subset_drop_above=args.subset_drop_above)
    if args.autotune:  # last: the longest to compile
        measures["dinoflow_autotune"] = lambda: time_dinoflow(args, device, True, crop_batch,
                                                              mode="max-autotune-no-cudagraphs")

    plain: float | None = None  # the eager probe's seconds per step: every row's reference
    kept: dict[str, Callable[[], None]] = {}  # the compiled rows' steps, for --rounds
    for label, measure in measures.items():
        compiled = label.endswith(("_compiled", "_cudagraphs", "_subset", "_autotune"))
        gc.collect()  # the last row's networks: compiled blocks hold themselves in a cycle
        start = 0
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device)  # the synthetic batch, the rows kept for --rounds
        skips = counters["inductor"]["cudagraph_skips"]
        try:
            timed = measure()
        except torch.OutOfMemoryError:  # a row too large for the card: say so, measure the others
            report["rows"].append({"step": label, "compiled": compiled, "error": "out of memory"})
            print(f"{label:<18} out of memory", flush=True)
        else:
            seconds = timed.seconds
            plain = seconds if label == "probe" else plain
            row = {"step": label, "compiled": compiled, "img_per_s": batch / seconds,
                   "tflop_per_s": batch * flops / seconds / 1e12, "peak_mib": peak_mib(device, start),
                   "ours_vs_probe": plain / seconds if plain else None, "compile_fell_back": timed.fell_back,
                   "cudagraph_skips": counters["inductor"]["cudagraph_skips"] - skips}
            for name, loop in (timed.loop_seconds or {}).items():
                row[f"{name}_img_per_s"] = batch / loop
            if timed.loop_error:
                row["loop_error"] = timed.loop_error
            if label == "dinoflow_subset":
                row.update(subset_drop_above=args.subset_drop_above, compile_mode=subset_mode)
            report["rows"].append(row)
            ratio = f"{row['ours_vs_probe']:>14.2f}" if plain else f"{'-':>14}"
            notes = row_notes(row)
            print(f"{label:<18} {row['img_per_s']:>10.1f} {row['tflop_per_s']:>12.4f} {row['peak_mib']:>9.0f} "
                  f"{ratio}" + "".join(f"  ({note})" for note in notes), flush=True)
            if args.rounds and compiled and not timed.loop_error:  # a step whose loop failed may fail the rounds
                kept[label] = timed.step
            del timed  # the row's networks go with its step, unless kept
        report["batch_preparation"] = preparation_figures(preparation, batch, report["rows"])
        write_figures(args.json, report)  # as each row completes: a run cut short keeps them
    print(preparation_text(report["batch_preparation"], f"batch preparation (multi-crop on {device}, masks on the host)"),
          flush=True)
    if "probe_compiled" in kept and len(kept) > 1:
        report["rounds"] = {"rounds": args.rounds, "steps": args.steps,
                            "ours_vs_probe": rounds_ratios(alternating_rounds(kept, args.rounds, args.steps, device))}
        print(rounds_text(report["rounds"]), flush=True)
        write_figures(args.json, report)


def alternating_rounds(steps: Mapping[str, Callable[[], None]], rounds: int, count: int,
                       device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of each of ``steps`` in each of ``rounds`` rounds: ``count`` timed steps
    after one untimed (the switch from another row's kernels and memory), the order of ``steps``
    reversed every other round. Rows timed one after the other, minutes apart, also measure the
    card's clocks drifting between them (warming up, power limits); here each round's rows share
    one stretch of them, and no row is always first."""
    seconds: dict[str, list[float]] = {label: [] for label in steps}
    timing = argparse.Namespace(steps=count, warmup=1)
    for index in range(rounds):
        for label in list(steps)[:: -1 if index % 2 else 1]:
            seconds[label].append(time_steps(steps[label], timing, device))
    return seconds


def rounds_ratios(seconds: Mapping[str, list[float]]) -> dict[str, list[float]]:
    """Each dinoflow row's img/s over the compiled probe's, round by round."""
    probe = seconds["probe_compiled"]
    return {label: [reference / ours for reference, ours in zip(probe, row)]
            for label, row in seconds.items() if label != "probe_compiled"}


def preparation_inputs(device: torch.device, cfg: PretrainConfig) -> tuple[MultiCrop, Tensor]:
    """The loop's multi-crop augmentation on ``device`` and a batch of random uint8 images of
    ``crops.load_size`` already there, fixed by ``cfg.seed``."""
    from trainer.data.augment import MultiCrop

    torch.manual_seed(cfg.seed)
    size = cfg.crops.load_size
    images = torch.randint(0, 256, (cfg.optim.batch_size, 3, size, size), dtype=torch.uint8, device=device)
    return MultiCrop(cfg.crops).to(device), images


def batch_preparation(multi_crop: MultiCrop, images: Tensor, cfg: PretrainConfig) -> Callable[[], CropBatch]:
    """What the training loop does to make each step's batch (:func:`make_batch`), on fresh
    steps: the multi-crop augmentation of ``images`` (on their device) and the block masks (drawn
    on the host, then copied)."""
    from trainer.batches import make_batch

    steps = itertools.count()  # each batch its own step's masks, as in training
    return lambda: make_batch(images, next(steps), cfg, multi_crop)


def preparation_figures(seconds: float, batch: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The batch preparation's img/s; with the fastest dinoflow row's step after it, the end-to-end
    img/s and the preparation's share of the time; and for each row timed as the loop runs (the next
    batch prepared in the step's wait) its img/s, alone and with the batch made on a second stream,
    or why that timing failed (printed by ``gpu_summary.preparation_text``)."""
    figures: dict[str, Any] = {"img_per_s": batch / seconds}
    steps = [row for row in rows if row["step"].startswith("dinoflow") and "img_per_s" in row]
    if steps:
        fastest = max(steps, key=lambda row: row["img_per_s"])
        step_seconds = batch / fastest["img_per_s"]
        figures.update(step=fastest["step"], end_to_end_img_per_s=batch / (seconds + step_seconds),
                       share=seconds / (seconds + step_seconds))
    loops = [{"step": row["step"], **{key.removeprefix("loop_"): row[key] for key in LOOP_KEYS if key in row}}
             for row in steps if any(key in row for key in LOOP_KEYS)]
    if loops:
        figures["loops"] = loops
    return figures


def probe_profile_path(profile: str) -> str:
    """Where the probe's profile goes next to dinoflow's ``profile`` (``x.txt`` -> ``x_probe.txt``)."""
    if not profile:
        return ""
    path = Path(profile)
    return str(path.with_name(f"{path.stem}_probe{path.suffix}"))


def time_probe(args: argparse.Namespace, device: torch.device, compiled: bool, shape: ProbeShape,
               crop_batch: CropBatch, profile: str = "") -> Timed:
    """Seconds per step of the ceiling probe (blocks compiled if ``compiled``), and whether their
    compilation fell back to eager (and no loop timing: the probe has no batch preparation); with
    ``profile``, two more steps profiled there."""
    from trainer.engine import training_autocast
    from trainer.models.compile import compile_blocks, is_compiled

    torch.manual_seed(0)
    student, teacher = ProbeViT(shape).to(device), ProbeViT(shape).to(device)
    if compiled:
        for network in (student, teacher):
            compile_blocks(network.blocks)
    optimizer = torch.optim.AdamW(student.parameters())  # the plain probe: torch's default AdamW
    global_crops, local_crops = crop_batch.global_crops.flatten(0, 1), crop_batch.local_crops.flatten(0, 1)
    autocast_dtype = training_autocast(device)  # the engine's, so both steps compute alike
    def step() -> None:
        probe_step(student, teacher, global_crops, local_crops, crop_batch.mask_index, optimizer, autocast_dtype)

    seconds = time_steps(step, args, device)
    if profile:
        write_profile(step, device, profile, f"the ceiling probe's step, compiled {compiled}, "
                                             f"batch {global_crops.shape[0] // 2}, on {device}")
    return Timed(seconds, compiled and not all(is_compiled(b) for b in (*student.blocks, *teacher.blocks)), None, step)


def time_dinoflow(args: argparse.Namespace, device: torch.device, compiled: bool,
                  crop_batch: CropBatch, profile: str = "", mode: str = "default",
                  prepare: Callable[[], CropBatch] | None = None,
                  subset_drop_above: float | None = None) -> Timed:
    """Seconds per step of the engine's step as the engine sets it up (its AdamW, bf16 autocast on
    CUDA) and its loop queues it (``queue_step``; with ``optim.lagged_loss_read``, the step before's
    losses read once this one is queued), with ``model.compile_blocks`` and ``loss.compile`` set to ``compiled`` (the
    blocks in ``model.compile_mode`` ``mode``), whether the compilation fell back to eager, and with
    ``prepare`` the seconds per step as the loop runs it (``loop``: each step on the batch
    ``prepare`` made during the step before, in its wait for the losses; ``loop_side_stream``: the
    same with the batch made on a second CUDA stream, ``data.side_stream``, a plain call off CUDA);
    with ``profile``, two more steps profiled on the fixed batch. ``subset_drop_above`` replaces
    ``SUBSET_DROP_ABOVE`` for this measurement (networks built, compiled and timed under it): where the
    subset form of stochastic depth starts."""
    from trainer.batches import SideStream
    from trainer.engine import LossReads, Objective, QueuedStep, build_networks, queue_step, training_autocast
    from trainer.models import layers
    from trainer.models.compile import is_compiled
    from trainer.optim import build_adamw
    from trainer.schedules import schedule_values

    if subset_drop_above is not None:
        subset = functools.partial(mock.patch.object, layers, "SUBSET_DROP_ABOVE", subset_drop_above)
        with subset():
            timed = time_dinoflow(args, device, compiled, crop_batch, profile, mode, prepare)

        def subset_step() -> None:  # the step kept for --rounds runs under the same rate
            with subset():
                timed.step()

        return timed._replace(step=subset_step)

    cfg = load_config(PretrainConfig, args.config,
                      [*args.overrides, f"model.compile_blocks={compiled}", f"loss.compile={compiled}",
                       f"model.compile_mode={mode}"])
    torch.manual_seed(cfg.seed)
    student, teacher = (network.to(device) for network in build_networks(cfg))
    objective = Objective(cfg).to(device)
    optimizer = build_adamw(student, cfg, device)
    sched = schedule_values(0, cfg.optim, cfg.loss, 1)
    autocast_dtype = training_autocast(device)
    reads = LossReads(cfg.optim.lagged_loss_read, report=lambda *_: None)  # the loop's reads, nothing logged

    def queue(batch: CropBatch, while_waiting: Callable[[], None] | None = None) -> None:
        """A step queued, and its losses or the step before's read as the loop reads them."""
        losses = queue_step(student, teacher, objective, [batch], sched, optimizer, cfg.optim.clip_grad, autocast_dtype,
                            while_waiting=while_waiting, after=reads.after)
        reads.queued(QueuedStep(0, sched, cfg.optim.batch_size, losses), now=lambda: False)

    def step() -> None:
        queue(crop_batch)

    seconds = time_steps(step, args, device)
    if profile:
        write_profile(step, device, profile, f"dinoflow's train_step, preset {args.config!r}, compiled {compiled}, "
                                             f"batch {cfg.optim.batch_size}, on {device}")
    loop_seconds, loop_error = None, None
    if prepare is not None:
        loop_seconds = {}
        for name, side in (("loop", SideStream(device, False)), ("loop_side_stream", SideStream(device, True))):
            upcoming = [side.run(prepare)]

            def loop_step() -> None:
                side.hand_over(upcoming)
                queue(upcoming.pop(), while_waiting=lambda: upcoming.append(side.run(prepare)))

            try:
                loop_seconds[name] = time_steps(loop_step, args, device)
            except Exception as error:  # noqa: BLE001 - a diagnostic: reported in the row, the others go on
                loop_error = f"{name}: {type(error).__name__}: {error}"
                break
    blocks = (*student.backbone.blocks, *teacher.backbone.blocks)
    return Timed(seconds, compiled and not (all(is_compiled(b) for b in blocks) and objective.tails_compiled()),
                 loop_seconds, step, loop_error)


def write_profile(step: Callable[[], None], device: torch.device, path: str, title: str) -> None:
    """Where two steps' time goes, by torch's profiler: the kernels' own time on a GPU (the
    operators' on CPU), largest first, as a table in ``path``, to choose the next change by; on a
    GPU also what is alive at a third step's memory peak (:func:`memory_peak.record_peak`) and where
    two more steps leave the GPU idle (:func:`device_timeline`)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as profiler:
        tick = time.perf_counter()
        for _ in range(2):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        seconds = (time.perf_counter() - tick) / 2
    table = profiler.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                          row_limit=60, max_name_column_width=90)
    text = f"{title}: {seconds * 1e3:.1f} ms a step under the profiler, 2 steps\n{table}"
    if cuda:
        text += "\n" + record_peak(step, device)
        timeline = device_timeline(step, device, path)
        text += f"\n\n{TIMELINE_MARK} (device activity only): {timeline}"
    Storage().write_bytes(path, text.encode())


def device_timeline(step: Callable[[], None], device: torch.device, path: str) -> str:
    """Two steps profiled for their device activity alone (no host operators recorded, so the
    profiler's host overhead opens no gaps of its own): their Chrome trace gzipped beside ``path``
    (``x.txt`` -> ``x_trace.json.gz``) and :func:`gpu_gaps.gap_report` of it. A diagnostic: if the
    profiler or its export fails, the text says how and the benchmark's rows go on."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as profiler:
            for _ in range(2):
                step()
            torch.cuda.synchronize(device)
        with tempfile.TemporaryDirectory() as folder:
            raw = Path(folder) / "trace.json"
            profiler.export_chrome_trace(str(raw))
            data = raw.read_bytes()
        Storage().write_bytes(str(Path(path).with_name(Path(path).stem + "_trace.json.gz")), gzip.compress(data))
        return gap_report(json.loads(data), steps=2)
    except Exception as error:  # noqa: BLE001 - reported in the profile's text instead
        return f"not recorded ({type(error).__name__}: {error})"


def main() -> None:
    args = parse_args()
    if args.probe:
        probe(args)
        return
    if args.worker:
        worker(args)
        return
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    per_rank = cfg.optim.batch_size
    configurations = [("single", 1, per_rank * args.nproc)]
    if args.strategy != "single":
        configurations.append((args.strategy, args.nproc, per_rank))
    rows = []
    load_before = os.getloadavg()[0]  # other work on the cores skews every figure: say how much there was
    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as scratch:
        for strategy, nproc, batch in progress(configurations, desc="train_step benchmark", unit="run"):
            rows.append(measure(strategy, nproc, batch, args, Path(scratch) / f"{strategy}-{nproc}"))
    m = cfg.model
    print(f"\nTraining step, preset {args.config!r} ({m.arch}, embed_dim {m.embed_dim}, depth {m.depth}, "
          f"{cfg.crops.num_local_crops} local crops, {cfg.optim.grad_accumulation} micro-batch(es) per step), "
          f"{args.threads} cores, {args.steps} timed steps after {args.warmup} warm-up; torch {torch.__version__}; "
          f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(format_table(rows))


if __name__ == "__main__":
    main()
