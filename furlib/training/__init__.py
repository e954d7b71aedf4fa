"""Stage 02, training: every parameter's default (``settings``) and its one check (``validation``),
the recipe's loss, critic and EMA, the step (``trainer``), what a run will do (``plan``) and the loop
(``fit``), the training input (``crops``, ``pixelcache``), one writer per run (``runlock``),
checkpoints and what a resume may change (``checkpoint``, ``resume``), logs and training figures."""
