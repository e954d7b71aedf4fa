"""Stage 02, training: the recipe's settings (``settings``), loss (``losses``), critic and EMA;
the step (``step``), the object holding a run's parts (``trainer``) and their set-up (``build``),
gradient averaging over GPUs (``grad_sync``), the loop (``fit``), the training input (``crops``,
``pixelcache``), checkpoints, logs and training figures."""
