"""Stage 04, export: the release files (``release_files``: diffusers folder, LDM single file,
manifest), each verified by reloading it (``verify``), the model card (``model_card``), and the
manifest's file table and the upload (``hub``)."""
