"""Stage 03, evaluation: metrics, the side-by-side evaluation of a run's checkpoints and other
VAEs (``evaluate``), its report files (``eval_report``), the decode checks (tiling, fp16) and the
comparison figures (``eval_figures``)."""
