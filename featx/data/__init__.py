"""Data: the work list (worklist.py), decoding one file (decode.py, gpu_decode.py) and the
loading stage that batches them (loader.py)."""
