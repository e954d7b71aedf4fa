#!/usr/bin/env bash
# Issue 21's device calls (third session), one function a call; the machine stays warm between
# calls, so the inductor cache in $CACHE that `warm` fills serves `timed` and `rows`.
#   bash benchmarks/step_calls.sh warm    # compile every variant, three at a time (one call)
#   bash benchmarks/step_calls.sh timed   # time them one by one, warm, then a kernel table
#   bash benchmarks/step_calls.sh table   # today's default beside plain-bf16, with its kernel table
# Each variant is its own process (train_step.py); $OUT receives logs and JSON. As run on
# 2026-12-06 (benchmarks/RESULTS.md, third session): `project` was then without the group-norm
# lever, which is now a default; its row today is `project[channel_stats_norm=False]`.
set -uo pipefail
cd "$(dirname "$0")/.."
CACHE=${STEP_CACHE:-/tmp/cc}
export TORCHINDUCTOR_CACHE_DIR=$CACHE TRITON_CACHE_DIR=$CACHE/triton
S="--flops 76868634017792"
GRAPHS="project[inductor_options={'force_layout_optimization': True, 'triton.cudagraphs': True}]"
VARIANTS=("project[tap_detached=False]" "project" "project[coordinate_descent_tuning=True]" "$GRAPHS"
          "project[channel_stats_norm=True]")

one() {  # one variant, a few steps: compiles it into $CACHE (a cold cache: minutes)
    local name=$1 tag=$2
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout "${LIMIT:-520}" python3 benchmarks/train_step.py $S --variant "$name" --steps 3 --warmup 3 \
        > "$OUT/warm-$tag.json" 2> "$OUT/warm-$tag.log"
    echo "$tag rc=$? $(date +%T)"
}

warm() {
    # three at a time: 3 x 22 GiB of steps fit an 80 GB card; the last two after the first two
    one "${VARIANTS[0]}" old & a=$!
    one "${VARIANTS[1]}" project & b=$!
    one "${VARIANTS[2]}" coordesc &
    wait $a $b
    LIMIT=300 one "${VARIANTS[3]}" graphs &
    LIMIT=300 one "${VARIANTS[4]}" gnorm &
    wait
}

timed() {
    local list
    # coordinate-descent tuning is left out: its compile did not finish within warm's 520 s
    list=$(printf ',%s' "plain-bf16" "${VARIANTS[0]}" "${VARIANTS[1]}" "${VARIANTS[3]}" "${VARIANTS[4]}" \
        "project[cudnn.benchmark_limit=0]")
    rows 470 150 "${list:1}"
    kernels 100 95 project
}

rows() {  # the variants $3 (comma-separated) timed one by one, 8 steps each: within $1 s, each $2 s
    timeout "$1" python3 benchmarks/train_step.py $S --steps 8 --warmup 3 --variant-timeout "$2" \
        --out "$OUT/step.json" --variants "$3" > "$OUT/step.log" 2>&1
    echo "timed rc=$? $(date +%T)"
}

kernels() {  # the kernel table of variant $3 (two profiled steps): within $1 s, the variant $2 s
    timeout "$1" python3 benchmarks/train_step.py $S --steps 4 --warmup 2 --variant-timeout "$2" \
        --profile /tmp/prof --out "$OUT/prof.json" --variants "$3" > "$OUT/prof.log" 2>&1
    echo "profile rc=$? $(date +%T)"
    cp /tmp/prof/*.txt "$OUT/" 2>/dev/null
}

table() {  # one call, cold cache: what the next lever should aim at (see RESULTS, fourth session);
           # the profile text ends with where the GPU idles (trace_gaps.py), the trace comes back too
    timeout 560 python3 benchmarks/train_step.py $S --steps 6 --warmup 2 --variant-timeout 400 \
        --profile /tmp/prof --out "$OUT/table.json" --variants "plain-bf16,project" > "$OUT/table.log" 2>&1
    echo "table rc=$? $(date +%T)"
    cp /tmp/prof/*.txt /tmp/prof/*.gz "$OUT/" 2>/dev/null
}

# Fourth session (2026-12-06, evening): the matrix-product levers and compiled pixel terms, one
# call. Today's default compiles alone first (the decoder's graphs, the long part, go into the
# cache); the variants then compile only their own graphs, in parallel. As run at 633b742:
# `last_layer_matmul` did not pay and was removed after it (variants naming it now fail).
NEW=("project[critic_patch_matmul=True]" "project[last_layer_matmul=True]" "project[compile_pixel_terms=True]"
     "project[critic_patch_matmul=True;last_layer_matmul=True;compile_pixel_terms=True]")

levers() {
    local out=$OUT  # at most 8 files come back: the compile logs travel as one archive
    OUT=/tmp/warm && mkdir -p $OUT
    one project project
    one "${NEW[0]}" patch & one "${NEW[1]}" lastlayer & one "${NEW[2]}" pixel & wait
    one "${NEW[3]}" all
    OUT=$out && tar czf "$OUT/warm.tgz" -C /tmp/warm .
    local list
    list=$(printf ',%s' "plain-bf16" "project" "${NEW[@]}")
    rows 300 100 "${list:1}"
    kernels 90 85 "${NEW[3]}"
}

# Fifth session (2026-12-06, night): the upsampling convs as transposed convs beside today's
# default, and the kernel table with the idle-gap summary. Both compile at once into one cache
# (two processes, 16 cores), then each is timed alone (today's default twice) and one is profiled.
# At most 8 files come back: logs and partial JSON travel as one archive.
TUP="project[transposed_upsample=True]"

upsample() {
    local out=$OUT
    OUT=/tmp/o && mkdir -p $OUT
    LIMIT=240 one project project & LIMIT=240 one "$TUP" tup & wait
    rows 190 60 "plain-bf16,project,$TUP,project"
    kernels 130 120 "$TUP"
    cp /tmp/prof/*.gz "$OUT/" 2>/dev/null
    mv $OUT/profile-*.txt $OUT/profile-*.gz $OUT/step.json "$out/" 2>/dev/null
    tar czf "$out/logs.tgz" -C $OUT . && OUT=$out
}

# The two levers built after the fifth session's device time ran out, beside today's default
# (one call, ~9 minutes): compile the default alone (the levers change no compiled graph), time
# each variant, interleaved, then what bf16 last-layer gradients change against TF32 on the card.
SYNC="project[step_before_check=True]"
LAST="project[last_layer_bf16=True]"
BOTH="project[step_before_check=True;last_layer_bf16=True]"

sixth() {
    LIMIT=240 one project project
    rows 280 60 "plain-bf16,project,$SYNC,$LAST,$BOTH,project"
    timeout 40 python3 benchmarks/last_layer_precision.py --device cuda --out "$OUT/last_layer_precision.json" \
        > "$OUT/precision.log" 2>&1
    echo "precision rc=$? $(date +%T)"
    rm -f "$OUT"/*.partial.json
}

# Sixth session (2026-12-06, late): `sixth` never ran (no machine for 20 minutes); one call instead
# times its two levers and the fused norm + SiLU backward (`norm_silu`), which changes the decoder's
# graphs, so it compiles beside today's default in a second process; then the backward's kernel
# alone beside inductor's (norm_silu_kernel.py) and the precision script.
FUSED="project[fused_norm_silu=True]"
ALL="project[fused_norm_silu=True;step_before_check=True;last_layer_bf16=True]"

seventh() {
    LIMIT=250 one project project & LIMIT=250 one "$FUSED" fused & wait
    rows 250 45 "plain-bf16,project,$FUSED,$SYNC,$LAST,$ALL,project"
    # at most 8 files come back: these two print their JSON into their logs
    timeout 45 python3 benchmarks/norm_silu_kernel.py > "$OUT/kernel.log" 2>&1
    echo "kernel rc=$? $(date +%T)"
    timeout 35 python3 benchmarks/last_layer_precision.py --device cuda > "$OUT/precision.log" 2>&1
    echo "precision rc=$? $(date +%T)"
    rm -f "$OUT"/*.partial.json  # as run; this also took the rows' partial JSON (step.log kept them)
}
# As run at 3f0a7df (benchmarks/RESULTS.md, sixth session): `step_before_check` did not pay and was
# removed after it, so `sixth` and `seventh` now fail at the variants that name it.

# Next (not yet run): 512 px x 8 and the Colab profile with today's default (the fused norms on),
# cold caches, one call (~7-9 minutes); the 512 px row beside the unfused norms and plain-bf16.
eighth() {
    timeout 330 python3 benchmarks/train_step.py --res 512 --batch 8 --flops 77770000000000 --steps 6 --warmup 2 \
        --variant-timeout 150 --out "$OUT/s512.json" --variants "project,project[fused_norm_silu=False],plain-bf16" \
        > "$OUT/s512.log" 2>&1
    echo "512 rc=$? $(date +%T)"
    timeout 260 python3 benchmarks/train_step.py --flops 76868634017792 --steps 3 --warmup 2 --variant-timeout 250 \
        --out "$OUT/colab.json" --variants "colab-t4" > "$OUT/colab.log" 2>&1
    echo "colab rc=$? $(date +%T)"
}

# Seventh session: the 256 px rows again on the same machine as `eighth` (when that came as an H200,
# the card issue 21's Done-when names): both norms compile at once, then interleaved rows.
UNFUSED="project[fused_norm_silu=False]"

ninth() {
    LIMIT=260 one project project & LIMIT=260 one "$UNFUSED" unfused & wait
    rows 300 60 "plain-bf16,project,$UNFUSED,project"
    rm -f "$OUT"/warm-*.json
}

# LPIPS's trunk in fp16 (``Tuning.lpips_fp16``): what it changes against the card's TF32, with the
# pretrained VGG (carried as .whl/vgg16_fp16.safetensors, its fp16 copy), then its step beside
# today's default, both with that trunk. Compile both at once, then interleaved rows. As run at
# 5d11102, where the two scripts' flags were --trunk-file and --lpips-trunk (now --lpips-trunks,
# both; `ablation.py trunks --out .whl/lpips_trunks_fp16.safetensors` writes such a file).
HALF="project[lpips_fp16=True]"

lpips16() {
    local T=.whl/vgg16_fp16.safetensors
    timeout 90 python3 benchmarks/lpips_precision.py --device cuda --res 256 --lpips-trunks $T \
        --modes tf32,tf32-emulated,bf16,fp16,fp16-trunk > "$OUT/precision.log" 2>&1
    echo "precision rc=$? $(date +%T)"
    local S="$S --lpips-trunks $T"
    LIMIT=250 one project project & LIMIT=250 one "$HALF" half & wait
    rows 250 50 "plain-bf16,project,$HALF,project,$HALF"
    rm -f "$OUT"/warm-*.json "$OUT"/*.partial.json
}

# Today's default in full, one call (8 minutes on an H100 at e99f449, cold cache; RESULTS, eighth
# device session: the H200 run the issue's Done-when names is this call again). The four
# processes compile at once; then 256 px beside plain-bf16 (the peak memory and chain time that
# lpips16's 50 s per variant did not reach), the Colab profile with and without LPIPS's trunk in
# fp16 on the loss scale (the fused norms under fp16 + scaler + checkpointing, first time on a
# GPU), 512 px x 8 beside plain-bf16, and one warm process that logs AOTAutograd's cache hits and
# bypasses (three bypasses at e99f449; none expected since `speed.use_compile_cache` lets graphs with
# an autograd.Function into that cache). A part that would end after
# $DEADLINE seconds of the script (565: a 600 s call, less the wheels' install) is skipped. At
# most 8 files come back.
COLAB16="colab-t4[lpips_fp16=False]"

fits() {  # whether $1 more seconds end by the deadline; says so when not
    [ $((SECONDS + $1)) -le "${DEADLINE:-565}" ] || { echo "skipped (needs $1 s more) $(date +%T)"; false; }
}

whole() {
    local T="--lpips-trunks .whl/vgg16_fp16.safetensors" R="--res 512 --batch 8 --flops 77770000000000"
    local S="$S $T" W=/tmp/w && mkdir -p $W
    timeout 230 python3 benchmarks/train_step.py $S --variant project --steps 2 --warmup 2 > /dev/null 2> $W/256.log &
    timeout 230 python3 benchmarks/train_step.py $S --variant colab-t4 --steps 2 --warmup 2 > /dev/null 2> $W/colab.log &
    timeout 230 python3 benchmarks/train_step.py $S --variant "$COLAB16" --steps 2 --warmup 2 > /dev/null 2> $W/colab32.log &
    fits 430 && timeout 230 python3 benchmarks/train_step.py $T $R --variant project --steps 2 --warmup 2 \
        > /dev/null 2> $W/512.log &
    wait
    echo "compiled $(date +%T)"
    rows 100 80 "plain-bf16,project"
    local left=$((${DEADLINE:-565} - SECONDS))  # the Colab rows run on what is left, up to 140 s
    timeout $((left < 140 ? left : 140)) python3 benchmarks/train_step.py $S --steps 3 --warmup 2 --variant-timeout 68 \
        --out "$OUT/colab.json" --variants "colab-t4,$COLAB16" > $W/colab-rows.log 2>&1
    echo "colab rc=$? $(date +%T)"
    fits 100 && timeout 100 python3 benchmarks/train_step.py $T $R --steps 6 --warmup 2 --variant-timeout 70 \
        --out "$OUT/s512.json" --variants "project,plain-bf16" > $W/s512.log 2>&1
    echo "512 rc=$? $(date +%T)"
    if fits 40; then
        TORCH_LOGS=torch._functorch._aot_autograd.autograd_cache timeout $((${DEADLINE:-565} - SECONDS)) \
            python3 benchmarks/train_step.py $S --variant project --steps 1 --warmup 1 > /dev/null 2> $W/aot.log
        echo "aot rc=$? $(date +%T)"
        grep -a "Bypassing\|cache hit\|cache miss" $W/aot.log > "$OUT/aot_cache.txt"
    fi
    mv "$OUT"/*.partial.json $W/ 2>/dev/null  # kept, in the archive: the rows of a cut-short run
    tar czf "$OUT/logs.tgz" -C $W .
}

profile() {  # today's default's kernel table and GPU idle gaps, warm after `whole` on the same machine
    timeout 560 python3 benchmarks/train_step.py $S --lpips-trunks .whl/vgg16_fp16.safetensors --steps 6 \
        --warmup 2 --variant-timeout 540 --profile /tmp/prof --out "$OUT/prof.json" --variants project \
        > "$OUT/prof.log" 2>&1
    echo "profile rc=$? $(date +%T)"
    cp /tmp/prof/*.txt /tmp/prof/*.gz "$OUT/" 2>/dev/null
}

"$@"
