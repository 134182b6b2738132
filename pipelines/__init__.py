"""Thin end-to-end jobs over the ``medsr`` library.

``pipelines.archive`` enhances a whole imaging archive (every NIfTI file and DICOM series under a folder) with a
resumable SQLite manifest, CPU worker processes and ``torchrun`` sharding; see ``medsr archive --help``.
"""
