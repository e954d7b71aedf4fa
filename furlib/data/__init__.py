"""Stage 01, data prep: how images from a source (``furlib.sources``) are checked, deduplicated and
split into ``outputs/<run>/data/`` (``prepare``, in parallel and in shards; ``input_entry``: one
input decoded, hashed and stored, as its journal entry; ``shares``: what each shard and process
reads), the folder's files and locks (``store``), the report and 02's check of it
(``prep_report``), and its figures (``prep_figures``)."""
