#!/usr/bin/env bash
# Issue 11's check on one GPU, in under 8 minutes on an H100; everything it writes goes to OUTDIR.
#
#   benchmarks/gpu_check.sh OUTDIR [--cpu-smoke]
#
# Steps, each under `timeout` (its own cap, and never past the run's budget of $BUDGET seconds,
# so one hang cannot eat the others' time; a step stopped by its timeout keeps the rows it had
# written):
#   env            nvidia-smi, torch and CUDA versions                          -> env.txt
#   correctness    benchmarks/gpu_correctness.py: backbone and one train_step on the GPU against the
#                  CPU from the same weights (fp32), bf16 autocast against fp32, compiled blocks
#                  against eager, the batch made on a second stream, the subset drop path replayed as
#                  CUDA graphs against its formula, a non-finite step's skip carried to the step
#                  queued behind it unread                                       -> correctness.json
#   (the steps that give issue 11's figures first, so that a budget cut short takes diagnostics only)
#   probe_small    benchmarks/train_step.py --probe --compile --cuda-graphs: ViT-S/14 recipe, batch 128,
#                  and dinoflow's compiled step once more with CUDA graphs, and once more so with stochastic
#                  depth in its subset form at the recipe's rate 0.1 (--subset-drop-above 0.05: the dropped
#                  samples skipped instead of masked, their rows moved by gathers) -> probe_small.json
#                  then --rounds 3: the compiled rows again, in three alternating rounds (ViT-S/14 is near
#                  the bar, where the card's clocks drifting between rows minutes apart could decide it)
#                  the compiled step's kernel-time table (torch profiler), what is alive at its
#                  memory peak and where its GPU sits idle between kernels (benchmarks/gpu_gaps.py, with
#                  the trace); the same for the compiled probe   -> profile_small.txt, profile_small_probe.txt,
#                                                         profile_small_trace.json.gz, profile_small_probe_trace.json.gz
#                  With AUTOTUNE=1 in the environment also once more with autotuned matrix products
#                  (train_step.py --autotune; its cap 180 s longer, so raise BUDGET by as much)
#   probe_large    --probe --compile only (four rows, no rounds nor profile), ViT-L/14, batch 64 -> probe_large.json
#   preparation    benchmarks/batch_preparation.py --sync-check: the loop's batch preparation at ViT-S/14's
#                  sizes alone, the host time it takes behind queued GPU work, whether any of its calls
#                  waits for the GPU, and its pixel stages eager against compiled -> preparation.json
#   loss_tail      benchmarks/loss_tail.py: the DINO/iBOT losses' element-wise tail on one block of
#                  rows x 65536 prototypes, eager, compiled and the library's way, the prototypes'
#                  weight norm, autograd's way and the head's, and ViT-S/14's shared head on CLS
#                  tokens and masked patches in one call against a call each  -> loss_tail.json
#   drop_path      benchmarks/drop_path.py: one compiled ViT-S/14 block at batch 128, forward and backward,
#                  with stochastic depth at 0.1 as a mask, in the subset form (gathers) and in the original's
#                  subset form (index_add), in alternating rounds, with the subset forms' difference from the
#                  same draws (last: what the budget leaves, at most 90 s on a GPU)  -> drop_path.json
#   flops_small,   benchmarks/step_flops.py: the matmul FLOPs per image of dinoflow's step at each probe's
#   flops_large    sizes, counted on the CPU (fake tensors, no GPU) while the GPU steps run, so that the
#                  summary gives dinoflow's rows their real TFLOP/s       -> flops_small.json, flops_large.json
#   summary        benchmarks/gpu_summary.py                                     -> summary.md, summary.json
# Both probes: 2 x 224 + 8 x 98 crops and 65536 prototypes (issue 11's sizes), eager and compiled
# rows of dinoflow's step and of the ceiling probe; the batch preparation alone, and the compiled
# and CUDA-graph dinoflow steps once more as the loop runs them (the next batch prepared in the
# step's wait). Each
# step's output is in <step>.log and the step table in steps.tsv. Exits 1 if a step failed or
# timed out (or a check failed), else 0.
#
# --cpu-smoke runs the same steps on the CPU with the tiny recipe in a few minutes (the second
# probe with the large recipe's code paths: SwiGLU, Sinkhorn-Knopp, a separate iBOT head and the
# subset drop path), to test this script; its figures mean nothing.
set -u -o pipefail

if [[ $# -lt 1 || $# -gt 2 || ( $# -eq 2 && $2 != --cpu-smoke ) ]]; then
    echo "usage: $0 OUTDIR [--cpu-smoke]" >&2
    exit 2
fi
OUT=$1
SMOKE=${2:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT" || exit 2
: > "$OUT/steps.tsv"
export PYTHONUNBUFFERED=1  # a step killed by its timeout still leaves its last lines in the log
started=$SECONDS
failed=0

# record NAME EXIT_CODE SECONDS LIMIT: a step's line in steps.tsv (its status from its exit code), and
# the run failed unless the code is 0
record() {
    local status
    case $2 in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    [[ $2 == 0 ]] || failed=1
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$status" "$2" "$3" "$4" >> "$OUT/steps.tsv"
    echo "== $1: $status"
}

# run_step NAME CAP_SECONDS COMMAND...: run under timeout, log to NAME.log, record a line in steps.tsv
run_step() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET - (SECONDS - started)))
    local limit=$((cap < left ? cap : left))
    if ((limit < 10)); then
        printf '%s\tskipped (budget spent)\t-\t0\t%s\n' "$name" "$limit" >> "$OUT/steps.tsv"
        failed=1
        return
    fi
    echo "== $name (at most ${limit}s)"
    local tick=$SECONDS
    timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
    record "$name" $? "$((SECONDS - tick))" "$limit"
    tail -n 8 "$OUT/$name.log"
}

# start_counting NAME CAP ARGS...: benchmarks/step_flops.py in the background on one CPU core (no
# GPU visible to it, so the timed steps keep the card and the other cores), under timeout like a
# step; finish_counting waits for each and records it in steps.tsv
counting=()
start_counting() {
    local name=$1 cap=$2
    shift 2
    local limit=$((cap < BUDGET ? cap : BUDGET))
    (
        tick=$SECONDS
        CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 timeout --kill-after=15 "$limit" "$PYTHON" benchmarks/step_flops.py \
            --json "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
        echo "$? $((SECONDS - tick)) $limit" > "$OUT/$name.rc"
    ) &
    counting+=("$name:$!")
}

finish_counting() {
    local entry name rc seconds limit
    for entry in "${counting[@]}"; do
        name=${entry%%:*}
        wait "${entry#*:}"
        if ! read -r rc seconds limit 2> /dev/null < "$OUT/$name.rc"; then
            rc=1 seconds=- limit=-  # its shell was killed before it could say
        fi
        rm -f "$OUT/$name.rc"
        record "$name" "$rc" "$seconds" "$limit"
        tail -n 6 "$OUT/$name.log"
    done
}

CROPS=(crops.global_crop_size=224 crops.local_crop_size=98 crops.num_local_crops=8)
# SMALL and LARGE: each probe's recipe and sizes; STEPS: timed steps after the warm-up
if [[ $SMOKE == --cpu-smoke ]]; then
    DEVICE=cpu
    CORRECTNESS=(--config tiny -- optim.batch_size=4 crops.num_local_crops=2)
    STEPS=(--steps 1 --warmup 1)
    ROUNDS=(--rounds 2)
    SMALL=(--config tiny -- optim.batch_size=4 crops.num_local_crops=2)
    LARGE=(--config tiny -- optim.batch_size=4 crops.num_local_crops=2 model.ffn_layer=swiglu
           loss.centering=sinkhorn_knopp heads.ibot_separate_head=true heads.ibot_num_prototypes=4096
           model.drop_path_rate=0.5)  # 4 of a group's 8 crops kept: the subset form
    TAIL=(--rows 64 --prototypes 4096 --steps 2 --head-rows 64 96)
    DROP=(--dim 32 --heads 4 --batch 5 --global-tokens 17 --local-tokens 5 --rate 0.4 --steps 1 --rounds 2)
    CAPS=(400 500 400 300)  # generous: inductor's first compilations on a cold cache, on cores other work shares
    PREPARATION_CAP=240  # the preparation compiled for its comparison: ten small graphs on a cold cache
    DROP_CAP=300  # three compiled forms of a block: 40 s alone, past 90 on cores a test suite shares
    AUTOTUNE_CAP=300
    BUDGET=${BUDGET:-1200}  # seconds for all timed steps together
else
    DEVICE=cuda
    CORRECTNESS=(--config vits14 -- optim.batch_size=4 "${CROPS[@]}")
    STEPS=(--steps 8 --warmup 2)
    ROUNDS=(--rounds 3)
    SMALL=(--config vits14 -- optim.batch_size=128 "${CROPS[@]}" heads.num_prototypes=65536)
    LARGE=(--config vitl14 -- optim.batch_size=64 "${CROPS[@]}" heads.num_prototypes=65536
           heads.ibot_num_prototypes=65536)
    TAIL=(--steps 20)  # the losses' block at ViT-S/14's 65536 prototypes: 1024 rows
    DROP=(--batch 128)  # ViT-S/14's block and rate
    CAPS=(150 270 180 240)  # the last: each FLOP count, on the CPU beside the GPU steps (ViT-L/14: ~1 minute)
    PREPARATION_CAP=90
    DROP_CAP=90
    AUTOTUNE_CAP=180
    BUDGET=${BUDGET:-450}
fi

echo "== env"
{
    date -u
    git -C "$ROOT" rev-parse HEAD 2>/dev/null
    timeout 30 nvidia-smi 2>&1 || echo "no nvidia-smi"
    timeout 60 "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'available', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
} > "$OUT/env.txt" 2>&1

start_counting flops_small "${CAPS[3]}" "${SMALL[@]}"
start_counting flops_large "${CAPS[3]}" "${LARGE[@]}"
run_step correctness "${CAPS[0]}" "$PYTHON" benchmarks/gpu_correctness.py --device "$DEVICE" --reference cpu \
    --compile --out "$OUT/correctness.json" "${CORRECTNESS[@]}"
SMALL_CAP=${CAPS[1]}
AUTOTUNE_ROW=()
if [[ ${AUTOTUNE:-0} == 1 ]]; then
    SMALL_CAP=$((SMALL_CAP + AUTOTUNE_CAP))
    AUTOTUNE_ROW=(--autotune)
fi
run_step probe_small "$SMALL_CAP" "$PYTHON" benchmarks/train_step.py --probe --compile --cuda-graphs \
    --subset-drop-above 0.05 "${AUTOTUNE_ROW[@]}" "${ROUNDS[@]}" --device "$DEVICE" \
    --json "$OUT/probe_small.json" --profile "$OUT/profile_small.txt" "${STEPS[@]}" "${SMALL[@]}"
run_step probe_large "${CAPS[2]}" "$PYTHON" benchmarks/train_step.py --probe --compile --device "$DEVICE" \
    --json "$OUT/probe_large.json" "${STEPS[@]}" "${LARGE[@]}"
run_step preparation "$PREPARATION_CAP" "$PYTHON" benchmarks/batch_preparation.py --device "$DEVICE" --sync-check \
    --json "$OUT/preparation.json" "${SMALL[@]}"
run_step loss_tail 60 "$PYTHON" benchmarks/loss_tail.py --device "$DEVICE" --json "$OUT/loss_tail.json" "${TAIL[@]}"
run_step drop_path "$DROP_CAP" "$PYTHON" benchmarks/drop_path.py --device "$DEVICE" --json "$OUT/drop_path.json" "${DROP[@]}"
finish_counting

echo "== summary (${OUT}/summary.md), $((SECONDS - started))s"
"$PYTHON" benchmarks/gpu_summary.py "$OUT" || failed=1
exit $failed
