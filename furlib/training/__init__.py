"""Stage 02, training, recipe first: the step (``trainer``: the ``Trainer`` and its step in one
file), the loss (``losses``: pixel terms, LPIPS, the critic, its penalty and the adaptive weight),
every parameter's default and its one check (``settings``), EMA (``ema``); what only makes it
faster, same maths (``speed``: compile, layouts, phase upsampling, gradient averaging); what a run
will do (``plan``) and the loop (``fit``); the training input (``crops``, ``pixelcache``;
``streaming`` for data never prepared); one writer per run (``runlock``), what a resume may change
(``resume``); logs (``logbook``) and the dashboard (``dashboard``)."""
