"""Stage 02, training: the recipe's settings, loss, critic and EMA, the step (``trainer``), the loop
(``fit``), the training input (``crops``, ``pixelcache``; ``streaming`` for data never prepared),
checkpoints, logs and training figures."""
