"""Stage 02, training: every parameter's default (``settings``) and its one check (``validation``);
the recipe's loss (``losses``), critic and EMA; the step (``step``), the object holding a run's parts
(``trainer``) and their set-up (``build``), gradient averaging over GPUs (``grad_sync``); what a run
will do (``plan``) and the loop (``fit``); the training input (``crops``, ``pixelcache``; ``streaming`` for data never prepared); one writer
per run (``runlock``), checkpoints and what a resume may change (``checkpoint``, ``resume``); logs
and training figures."""
