"""Stage 01, data prep: where images come from (``sources``, ``builtin``), how they are checked,
deduplicated and split into ``outputs/<run>/data/`` (``prepare``, in parallel and in shards), the
folder's files and locks (``store``), the report and 02's check of it (``report``), and its figures
(``plots``)."""
