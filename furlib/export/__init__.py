"""Stage 04, export: the release files (``release_files``: diffusers folder, LDM single file,
manifest), each verified by reloading it, and the model card."""
