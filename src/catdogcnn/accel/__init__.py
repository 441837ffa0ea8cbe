"""CPU acceleration: hand-written C kernels (`kernels.c`) and their loader (`kernels.py`), in one place.

Loading them changes no process-wide setting; they are built on first use into the cache folder
(`$CATDOGCNN_CACHE/kernels`), never at import.
"""
