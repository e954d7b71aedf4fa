"""Stage 01, data prep: where images come from (``sources``, ``builtin``), how they are checked,
deduplicated and split into ``outputs/<run>/data/`` (``prepare``), and its figures (``plots``)."""
