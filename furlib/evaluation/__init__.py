"""Stage 03, evaluation: metrics, the side-by-side evaluation of VAEs, its report files, the decode
checks (tiling, fp16) and the comparison figures."""
