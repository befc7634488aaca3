"""Machine checks run by ``bench.py`` that are too long for it: ``gpu_check`` (``python bench.py gpu-check``)."""
